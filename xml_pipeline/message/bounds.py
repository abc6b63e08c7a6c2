"""Tell, before writing a payload as XML, that it cannot fit the size and depth bounds.

A handler that returns a gigabyte of text would otherwise be written out in
full (a tree, then bytes: several copies), validated and only then refused,
holding the event loop and the memory all the while; and one nested a
thousand levels deep would exhaust the recursion of the writer. This walk
looks at the Python values instead, without recursion, and stops as soon as
the text alone passes the byte bound or the nesting passes the depth bound.
Both are lower bounds of what the XML would need, so a payload that fits is
never refused here; the exact check runs on the written XML afterwards.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from xml_pipeline.message.safe_xml import XmlLimits, XmlRejected
from xml_pipeline.message.system_payloads import ErrorCode

_TEXT, _BASE64, _ITEMS, _FIELDS, _ENUM, _OTHER = range(6)
"""What a value adds to the walk, by its class: text, base64 text, items, fields, an enum's value, nothing."""
_KINDS: dict[type, tuple[int, tuple[str, ...]]] = {}
"""Each class's kind (and a dataclass's field names), worked out once: the walk runs on every hop."""


def _kind_of(cls: type) -> tuple[int, tuple[str, ...]]:
    if issubclass(cls, str):
        kind: tuple[int, tuple[str, ...]] = (_TEXT, ())
    elif issubclass(cls, bytes | bytearray):
        kind = (_BASE64, ())
    elif issubclass(cls, list | tuple):
        kind = (_ITEMS, ())
    elif dataclasses.is_dataclass(cls):
        kind = (_FIELDS, tuple(field.name for field in dataclasses.fields(cls)))
    elif issubclass(cls, enum.Enum):
        kind = (_ENUM, ())
    else:
        kind = (_OTHER, ())
    _KINDS[cls] = kind
    return kind


def refuse_if_beyond(payload: Any, limits: XmlLimits) -> None:
    """Raise XmlRejected (too-large, too-deep) when ``payload`` cannot fit, whatever its XML.

    The walk goes a level at a time (an enum's value stays on its enum's
    level), so its only bookkeeping is the list of the next level's values.
    """
    budget = limits.max_bytes
    deepest = limits.max_depth - 1  # the envelope's <message> holds the payload element
    text = 0
    level, values = 1, [payload]
    kinds = _KINDS
    while values:
        if level > deepest:
            raise XmlRejected(ErrorCode.TOO_DEEP, f"nesting would be deeper than the limit of {limits.max_depth}")
        below: list[Any] = []
        for value in values:
            cls = type(value)
            kind, names = kinds.get(cls) or _kind_of(cls)
            if kind == _OTHER:
                continue
            if kind == _TEXT:
                text += len(value)
            elif kind == _FIELDS:
                below.extend([getattr(value, name) for name in names])
            elif kind == _ITEMS:
                below.extend(value)
            elif kind == _BASE64:
                text += len(value) * 4 // 3
            else:  # an enum: its value, on the same level
                values.append(value.value)
            if text > budget:
                raise XmlRejected(
                    ErrorCode.TOO_LARGE, f"the message would be over {budget} bytes; the limit is {budget}"
                )
        level, values = level + 1, below
