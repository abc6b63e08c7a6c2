"""Parsing bytes nobody vouches for.

Three layers keep DTDs harmless, so no single slip opens a hole:

- The parser never loads anything from outside: no DTD loading, no entity
  substitution, no network, and a resolver that refuses every external fetch
  libxml2 might still attempt. (``collect_ids=False`` is *not* used: lxml
  implements it through libxml2's ``loadsubset`` flags, which makes libxml2
  load a document's external subset even with ``load_dtd=False``.)
- After parsing, the document's ``docinfo`` is checked: any DOCTYPE, internal
  subset or external subset refuses the message. This sees a DTD whatever the
  encoding it was written in, and text that merely looks like one (in CDATA,
  say) is text.
- Only UTF-8 (declared ``utf-8``, ``utf8``, ``us-ascii`` or ``ascii``) and
  UTF-16 with its byte order mark are accepted. Other encodings (UTF-7,
  UTF-32, EBCDIC, Latin-1) add nothing an envelope needs and are where
  byte-level checks go blind.

Size is checked before parsing; depth cheaply before and exactly after.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
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


class _ExternalFetchRefused(Exception):
    """Raised inside libxml2's loader when a document asks for anything outside itself."""


class _RefuseEveryFetch(etree.Resolver):
    """The last line: even if libxml2 decides to load a DTD or entity, nothing is opened."""

    def resolve(  # type: ignore[override]  # the stubs omit the context argument lxml passes
        self, system_url: str | None, public_id: str | None, context: object
    ) -> Any:
        raise _ExternalFetchRefused(system_url or public_id or "an external resource")


def _parser(recover: bool) -> etree.XMLParser:
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        attribute_defaults=False,
        huge_tree=False,
        recover=recover,
        remove_comments=True,  # carry no payload data; dropping them keeps each field's text in .text
        remove_pis=True,
    )
    parser.resolvers.add(_RefuseEveryFetch())
    return parser


_STRICT = _parser(recover=False)
_REPAIRING = _parser(recover=True)


@functools.lru_cache(maxsize=8)
def _deeper_than(max_depth: int) -> etree.XPath:
    """An XPath that is true when some element sits below ``max_depth`` levels."""
    return etree.XPath("boolean(" + "/*" * (max_depth + 1) + ")")


def _could_be_deeper(raw: bytes, max_depth: int, *, closed: bool = True) -> bool:
    """Cheap bounds first: depth needs that many start tags, and each needs bytes.

    An element below ``max_depth`` levels has ``max_depth`` ancestors, each
    opened and, in a well-formed document (``closed``), closed again: at least
    ``2 * max_depth + 1`` ``<`` characters. Every ``<`` is a ``0x3C`` byte in
    UTF-8 and in UTF-16 alike (other UTF-16 characters may add more), so one
    byte count bounds the depth from above without parsing. A document the
    repairing parser mended may leave its elements open; there each start tag
    alone counts (``<`` not followed by ``/``, in UTF-8).
    """
    if len(raw) < 7 * max_depth + 4:  # the smallest document deeper than max_depth
        return False
    if closed:
        return raw.count(b"<") > 2 * max_depth
    return raw.count(b"<") - raw.count(b"</") > max_depth


ACCEPTED_ENCODINGS = frozenset({"utf-8", "utf8", "us-ascii", "ascii", "utf-16"})
"""Declared encodings accepted, in lower case: UTF-8, ASCII (a subset of it) and UTF-16, by these names only."""

_UTF32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"
_EBCDIC_DECLARATION = b"\x4c\x6f\xa7\x94"  # "<?xm" in EBCDIC, which starts with the ASCII letters "Lo"
_NEEDS_A_LOOK = (b"?", b"\x00")
"""After a first ``<``: a declaration (which may name UTF-16), or UTF-16 without its byte order mark."""
_DECLARES_UTF16 = re.compile(rb"<\?xml\s[^>]*?\bencoding\s*=\s*[\"']utf-16[\"']", re.IGNORECASE)


def _refuse_foreign_encoding(raw: bytes) -> None:
    """Refuse bytes that are neither UTF-8 (or ASCII) nor UTF-16 with its byte order mark.

    The bytes alone settle the family before libxml2 guesses; the declared
    encoding is checked after parsing, from ``docinfo``.
    """
    if raw[:1] == b"<" and raw[1:2] not in _NEEDS_A_LOOK:  # markup in UTF-8 (or ASCII), no declaration: settled
        return
    if raw.startswith(_UTF32_BOMS):
        raise XmlRejected(ErrorCode.UNSUPPORTED_ENCODING, "UTF-32 is not accepted; send UTF-8 or UTF-16")
    if raw.startswith(_EBCDIC_DECLARATION):
        raise XmlRejected(ErrorCode.UNSUPPORTED_ENCODING, "EBCDIC is not accepted; send UTF-8 or UTF-16")
    if raw.startswith((_UTF8_BOM, *_UTF16_BOMS)):
        return
    head = raw[:2]
    if head[:1] >= b"\x80" or b"\x00" in head:
        raise XmlRejected(
            ErrorCode.UNSUPPORTED_ENCODING,
            "the bytes are not UTF-8, and UTF-16 needs its byte order mark; send UTF-8 or UTF-16",
        )
    if _DECLARES_UTF16.match(raw, 0, 256):  # libxml2 would read these 8-bit bytes as UTF-16 and call them malformed
        raise XmlRejected(
            ErrorCode.UNSUPPORTED_ENCODING,
            "UTF-16 is declared, but UTF-16 needs its byte order mark and these bytes have none;"
            " send UTF-8, or UTF-16 with its byte order mark",
        )


def _carries_dtd(raw: bytes) -> bool:
    """Whether a document that failed to parse declared a DTD, as far as the repairing parser sees.

    Only the error path asks, so that a DTD that broke the strict parse is
    reported as what it is rather than as malformed XML.
    """
    try:
        root = etree.fromstring(raw, _REPAIRING)
    except _ExternalFetchRefused:
        return True
    except (etree.XMLSyntaxError, ValueError):
        return False
    return root is not None and _declares_dtd(_docinfo(root))


def _docinfo(root: etree._Element) -> Any:
    """The document's DocInfo, typed loosely: the stubs lack ``doctype`` and ``externalDTD``."""
    return root.getroottree().docinfo


def _declares_dtd(docinfo: Any) -> bool:
    return bool(docinfo.doctype) or docinfo.internalDTD is not None or docinfo.externalDTD is not None


def _refuse_foreign_declaration_and_dtd(root: etree._Element) -> None:
    docinfo = _docinfo(root)
    declared = (docinfo.encoding or "utf-8").lower()
    if declared not in ACCEPTED_ENCODINGS:
        raise XmlRejected(
            ErrorCode.UNSUPPORTED_ENCODING, f"encoding {docinfo.encoding!r} is not accepted; send UTF-8 or UTF-16"
        )
    if _declares_dtd(docinfo):
        raise XmlRejected(ErrorCode.FORBIDDEN_DTD, "DOCTYPE and entity declarations are not accepted")


@dataclass(frozen=True, slots=True)
class Parsed:
    root: etree._Element
    repairs: tuple[str, ...] = ()


def parse_checked(raw: bytes, limits: XmlLimits) -> Parsed:
    """Parse ``raw`` under ``limits``; raises :class:`XmlRejected`.

    With ``limits.repair`` a document that is not well-formed is parsed again
    by the recovering parser, and the repairs are reported; but never one
    whose trouble is an entity, a character reference, an encoding or a
    markup declaration: repairing those would mean guessing at text (or
    dropping a DOCTYPE silently), so they are refused as without repair.
    """
    if len(raw) > limits.max_bytes:
        raise XmlRejected(ErrorCode.TOO_LARGE, f"message is {len(raw)} bytes; the limit is {limits.max_bytes}")
    _refuse_foreign_encoding(raw)
    repairs: tuple[str, ...] = ()
    well_formed = True
    try:
        root = etree.fromstring(raw, _STRICT)
    except _ExternalFetchRefused as exc:
        raise XmlRejected(ErrorCode.FORBIDDEN_DTD, f"the document asks to load {exc}; nothing is loaded") from None
    except etree.XMLSyntaxError as exc:
        if not limits.repair or not _repairable(exc, raw):
            raise _refusal_for(exc, raw, limits) from None
        root, repairs = _repaired(raw)
        well_formed = False
    except ValueError as exc:  # e.g. a str with an encoding declaration
        raise XmlRejected(ErrorCode.MALFORMED_XML, f"not parseable: {exc}") from None
    _refuse_foreign_declaration_and_dtd(root)
    deeper = _could_be_deeper(raw, limits.max_depth, closed=well_formed)
    if deeper and _deeper_than(limits.max_depth)(root):
        raise XmlRejected(ErrorCode.TOO_DEEP, f"nesting is deeper than the limit of {limits.max_depth}")
    return Parsed(root, repairs)


_UNREPAIRABLE = frozenset(
    getattr(etree.ErrorTypes, name)
    for name in dir(etree.ErrorTypes)
    if name.startswith(("ERR_ENTITY", "ERR_PEREF", "ERR_CHARREF", "ERR_INVALID_", "ERR_UNDECLARED_ENTITY"))
    or name in {"ERR_RESOURCE_LIMIT", "ERR_UNPARSED_ENTITY", "ERR_DOCTYPE_NOT_FINISHED", "ERR_NO_DTD"}
    or "ENCODING" in name
)
_DECLARATIONS = (b"<!DOCTYPE", b"<!ENTITY", b"<!ELEMENT", b"<!ATTLIST")


def _repairable(exc: etree.XMLSyntaxError, raw: bytes) -> bool:
    code = getattr(exc, "code", None)  # the stubs lack .code
    if code in _UNREPAIRABLE or "depth" in str(exc).lower():
        return False
    return not any(declaration in raw for declaration in _DECLARATIONS)


def _repaired(raw: bytes) -> tuple[etree._Element, tuple[str, ...]]:
    try:
        root = etree.fromstring(raw, _REPAIRING)
    except _ExternalFetchRefused as exc:
        raise XmlRejected(ErrorCode.FORBIDDEN_DTD, f"the document asks to load {exc}; nothing is loaded") from None
    except etree.XMLSyntaxError as exc:
        raise XmlRejected(ErrorCode.MALFORMED_XML, f"not well-formed XML, beyond repair: {exc}") from None
    if root is None:
        raise XmlRejected(ErrorCode.MALFORMED_XML, "not well-formed XML: nothing could be recovered")
    return root, tuple(f"line {e.line}: {e.message}" for e in _REPAIRING.error_log)


def _refusal_for(exc: etree.XMLSyntaxError, raw: bytes, limits: XmlLimits) -> XmlRejected:
    """What a document the strict parser refused is told, by what broke it."""
    if "depth" in str(exc).lower():
        return XmlRejected(ErrorCode.TOO_DEEP, f"nesting is deeper than the limit of {limits.max_depth}")
    if getattr(exc, "code", None) == etree.ErrorTypes.ERR_UNSUPPORTED_ENCODING:  # the stubs lack .code
        return XmlRejected(ErrorCode.UNSUPPORTED_ENCODING, f"{exc}; send UTF-8 or UTF-16")
    if _carries_dtd(raw) or (limits.repair and any(declaration in raw for declaration in _DECLARATIONS)):
        return XmlRejected(ErrorCode.FORBIDDEN_DTD, "DOCTYPE and entity declarations are not accepted")
    return XmlRejected(ErrorCode.MALFORMED_XML, f"not well-formed XML: {exc}")


ENVELOPE_ALLOWANCE = 4096
"""Bytes a payload may be short of the limit and still need its envelope measured (names, thread)."""


def check_outgoing(
    payload_xml: bytes, element: etree._Element, limits: XmlLimits, *, envelope_size: Callable[[], int]
) -> None:
    """Hold a payload a handler produced to the limits an incoming message meets.

    A handler's output becomes the next hop's input, so the same size and depth
    bounds apply to it; checking here, before it is validated, decoded, recorded
    and queued, keeps one runaway handler from multiplying its output in memory.
    ``envelope_size`` is asked only when the payload is near the limit.
    """
    size = len(payload_xml)
    if size > limits.max_bytes - ENVELOPE_ALLOWANCE:
        size += envelope_size()
        if size > limits.max_bytes:
            raise XmlRejected(
                ErrorCode.TOO_LARGE, f"the message would be {size} bytes; the limit is {limits.max_bytes}"
            )
    payload_depth = limits.max_depth - 1  # the envelope's <message> holds the payload
    if _could_be_deeper(payload_xml, payload_depth) and _deeper_than(payload_depth)(element):
        raise XmlRejected(ErrorCode.TOO_DEEP, f"nesting would be deeper than the limit of {limits.max_depth}")


def schema_error(schema: etree.XMLSchema) -> str:
    """The first complaint of ``schema``'s last validation, in one sentence."""
    entries: Iterable[Any] = schema.error_log  # type: ignore[assignment]  # iterable; the stubs miss it
    for entry in entries:
        return f"line {entry.line}: {entry.message}" if entry.line > 1 else entry.message
    return "does not match the schema"


def parse_untrusted(raw: bytes, limits: XmlLimits | None = None) -> etree._Element:
    """Strictly parse one document, for callers outside the pump (tools, history)."""
    return parse_checked(raw, limits or XmlLimits()).root
