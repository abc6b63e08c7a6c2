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

_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = tuple(field.name for field in dataclasses.fields(cls))
        _FIELDS[cls] = names
    return names


def refuse_if_beyond(payload: Any, limits: XmlLimits) -> None:
    """Raise XmlRejected (too-large, too-deep) when ``payload`` cannot fit, whatever its XML."""
    budget = limits.max_bytes
    deepest = limits.max_depth - 1  # the envelope's <message> holds the payload element
    text = 0
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        value, level = stack.pop()
        if level > deepest:
            raise XmlRejected(ErrorCode.TOO_DEEP, f"nesting would be deeper than the limit of {limits.max_depth}")
        if isinstance(value, str):
            text += len(value)
        elif isinstance(value, bytes | bytearray):
            text += len(value) * 4 // 3  # base64
        elif isinstance(value, list | tuple):
            stack.extend((item, level + 1) for item in value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend((getattr(value, name), level + 1) for name in _field_names(type(value)))
        elif isinstance(value, enum.Enum):
            stack.append((value.value, level))
        if text > budget:
            raise XmlRejected(ErrorCode.TOO_LARGE, f"the message would be over {budget} bytes; the limit is {budget}")
