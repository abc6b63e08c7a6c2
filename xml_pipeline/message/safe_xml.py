"""Parsing bytes nobody vouches for.

Limits are checked before parsing where the bytes alone can tell (size, a
DOCTYPE), and right after parsing otherwise (depth, a DTD hidden behind a
non-UTF-8 encoding). DTDs are refused outright rather than parsed carefully:
no valid envelope needs one, and refusing them closes XXE, billion laughs and
every other entity trick at once. The parser never resolves entities and never
touches the network.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from xml_pipeline.message.system_payloads import ErrorCode

LIBXML2_DEPTH_CEILING = 256
"""libxml2 refuses deeper documents itself unless ``huge_tree`` is on (it is not)."""


@dataclass(frozen=True, slots=True)
class XmlLimits:
    max_bytes: int = 1024 * 1024
    max_depth: int = 64
    repair: bool = False

    def __post_init__(self) -> None:
        if self.max_bytes < 256:
            raise ValueError("max_bytes must be at least 256")
        if not 4 <= self.max_depth <= LIBXML2_DEPTH_CEILING - 1:
            raise ValueError(f"max_depth must be between 4 and {LIBXML2_DEPTH_CEILING - 1}")


class XmlRejected(Exception):
    """The bytes cannot become a message; ``code`` says which limit or rule they broke."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _parser(recover: bool) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        collect_ids=False,
        recover=recover,
        remove_comments=True,  # carry no payload data; dropping them keeps each field's text in .text
        remove_pis=True,
    )


_STRICT = _parser(recover=False)
_REPAIRING = _parser(recover=True)


@functools.lru_cache(maxsize=8)
def _deeper_than(max_depth: int) -> etree.XPath:
    """An XPath that is true when some element sits below ``max_depth`` levels."""
    return etree.XPath("boolean(" + "/*" * (max_depth + 1) + ")")


def _could_be_deeper(raw: bytes, max_depth: int) -> bool:
    """Cheap bounds first: depth needs that many start tags, and each needs bytes.

    ``<`` not followed by ``/`` counts every start tag (and some other markup),
    so it bounds the depth from above without parsing.
    """
    if len(raw) < 7 * max_depth + 4:  # the smallest document deeper than max_depth
        return False
    return raw.count(b"<") - raw.count(b"</") > max_depth


def _ascii_compatible(raw: bytes) -> bool:
    """True when markup is plain ASCII bytes (UTF-8 and kin), so a byte scan sees a DOCTYPE."""
    return (raw[:1] == b"<" and raw[1:2] != b"\x00") or raw[:3] == b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Parsed:
    root: etree._Element
    repairs: tuple[str, ...] = ()


def parse_checked(raw: bytes, limits: XmlLimits) -> Parsed:
    """Parse ``raw`` under ``limits``; raises :class:`XmlRejected`."""
    if len(raw) > limits.max_bytes:
        raise XmlRejected(ErrorCode.TOO_LARGE, f"message is {len(raw)} bytes; the limit is {limits.max_bytes}")
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise XmlRejected(ErrorCode.FORBIDDEN_DTD, "DOCTYPE and entity declarations are not accepted")
    parser = _REPAIRING if limits.repair else _STRICT
    try:
        root = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as exc:
        if "depth" in str(exc).lower():
            raise XmlRejected(ErrorCode.TOO_DEEP, f"nesting is deeper than the limit of {limits.max_depth}") from None
        raise XmlRejected(ErrorCode.MALFORMED_XML, f"not well-formed XML: {exc}") from None
    except ValueError as exc:  # e.g. a str with an encoding declaration
        raise XmlRejected(ErrorCode.MALFORMED_XML, f"not parseable: {exc}") from None
    if root is None:
        raise XmlRejected(ErrorCode.MALFORMED_XML, "not well-formed XML: nothing could be recovered")
    if not _ascii_compatible(raw):  # the byte scan above cannot see a DOCTYPE in UTF-16 and the like
        docinfo = root.getroottree().docinfo
        if docinfo.internalDTD is not None or docinfo.doctype:
            raise XmlRejected(ErrorCode.FORBIDDEN_DTD, "DOCTYPE and entity declarations are not accepted")
    if _could_be_deeper(raw, limits.max_depth) and _deeper_than(limits.max_depth)(root):
        raise XmlRejected(ErrorCode.TOO_DEEP, f"nesting is deeper than the limit of {limits.max_depth}")
    repairs: tuple[str, ...] = ()
    if limits.repair and parser.error_log:
        repairs = tuple(f"line {e.line}: {e.message}" for e in parser.error_log)
    return Parsed(root, repairs)


def schema_error(schema: etree.XMLSchema) -> str:
    """The first complaint of ``schema``'s last validation, in one sentence."""
    entries: Iterable[Any] = schema.error_log  # type: ignore[assignment]  # iterable; the stubs miss it
    for entry in entries:
        return f"line {entry.line}: {entry.message}" if entry.line > 1 else entry.message
    return "does not match the schema"


def parse_untrusted(raw: bytes, limits: XmlLimits | None = None) -> etree._Element:
    """Strictly parse one document, for callers outside the pump (tools, history)."""
    return parse_checked(raw, limits or XmlLimits()).root
