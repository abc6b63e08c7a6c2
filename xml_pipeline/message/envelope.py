"""The envelope every message travels in: who sent it, to whom, on which thread.

The XSD ships in the package (``schemas/envelope.xsd``) and is compiled once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from xml.sax.saxutils import escape

from lxml import etree

from xml_pipeline.message.safe_xml import XmlRejected, schema_error
from xml_pipeline.message.system_payloads import ErrorCode

ENVELOPE_NS = "https://xml-pipeline.org/ns/envelope/v1"
LISTENER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*\Z")
"""What ``from`` and ``to`` may hold; the same pattern as in envelope.xsd."""
THREAD_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_MESSAGE = f"{{{ENVELOPE_NS}}}message"
_META = f"{{{ENVELOPE_NS}}}meta"
_FROM = f"{{{ENVELOPE_NS}}}from"
_TO = f"{{{ENVELOPE_NS}}}to"
_THREAD = f"{{{ENVELOPE_NS}}}thread"
_NSMAP = {"xp": ENVELOPE_NS}
"""Emitted envelopes use a prefix, never a default namespace: a default namespace
would capture a no-namespace payload on re-parse unless every payload element
carried ``xmlns=""``, which lxml does not write for moved elements."""


def _load_schema() -> etree.XMLSchema:
    xsd = resources.files("xml_pipeline.schemas").joinpath("envelope.xsd").read_bytes()
    return etree.XMLSchema(etree.fromstring(xsd))


ENVELOPE_SCHEMA = _load_schema()


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated envelope. ``payload`` is the one payload element, not yet validated."""

    sender: str
    to: str | None
    thread: str
    payload: etree._Element


def read_envelope(root: etree._Element) -> Envelope:
    """Validate ``root`` as an envelope and pull out its parts; raises XmlRejected."""
    if root.tag != _MESSAGE:
        raise XmlRejected(
            ErrorCode.ENVELOPE_INVALID,
            f"root element is <{_display_tag(root.tag)}>; expected <message> in {ENVELOPE_NS}",
        )
    if not ENVELOPE_SCHEMA.validate(root):
        raise XmlRejected(ErrorCode.ENVELOPE_INVALID, f"envelope: {schema_error(ENVELOPE_SCHEMA)}")
    meta = root[0]
    to = meta[1].text if len(meta) == 3 else None
    payload = root[1]
    if isinstance(payload.tag, str) and payload.tag.startswith(f"{{{ENVELOPE_NS}}}"):
        raise XmlRejected(ErrorCode.ENVELOPE_INVALID, "the payload must not be in the envelope namespace")
    return Envelope(sender=str(meta[0].text), to=to, thread=str(meta[-1].text), payload=payload)


def best_effort_origin(root: etree._Element) -> tuple[str | None, str | None]:
    """(from, thread) of an envelope that failed validation, each only if it is valid.

    An error reply must itself be a valid envelope, so a sender name or thread
    that breaks the envelope's rules is not echoed back.
    """
    sender = (root.findtext(f"{_META}/{_FROM}") or "").strip()
    thread = (root.findtext(f"{_META}/{_THREAD}") or "").strip()
    return (
        sender if LISTENER_NAME.match(sender) and len(sender) <= 200 else None,
        thread if THREAD_ID.match(thread) else None,
    )


def build_envelope(sender: str, to: str | None, thread: str, payload: etree._Element) -> etree._Element:
    """An envelope element around ``payload`` (which is moved into it, not copied)."""
    message = etree.Element(_MESSAGE, nsmap=_NSMAP)
    meta = etree.SubElement(message, _META)
    etree.SubElement(meta, _FROM).text = sender
    if to is not None:
        etree.SubElement(meta, _TO).text = to
    etree.SubElement(meta, _THREAD).text = thread
    message.append(payload)
    return message


MESSAGE_END = b"</xp:message>"


def serialize_envelope(sender: str, to: str | None, thread: str, payload: etree._Element) -> bytes:
    return etree.tostring(build_envelope(sender, to, thread, payload))


_ENVELOPE_OPEN = f'<xp:message xmlns:xp="{ENVELOPE_NS}"><xp:meta><xp:from>'.encode()


def _text(value: str) -> bytes:
    """Element text as lxml writes it: ``&``, ``<``, ``>`` escaped, ASCII with character references."""
    return escape(value).encode("ascii", "xmlcharrefreplace")


def envelope_bytes(sender: str, to: str | None, thread: str, payload_xml: bytes) -> bytes:
    """The bytes :func:`serialize_envelope` writes, around a payload serialized on its own.

    The pump serializes every reply's payload anyway (for history), so wrapping
    those bytes costs a join instead of a second tree and a second serialization.
    """
    parts = [_ENVELOPE_OPEN, _text(sender), b"</xp:from>"]
    if to is not None:
        parts += [b"<xp:to>", _text(to), b"</xp:to>"]
    parts += [b"<xp:thread>", _text(thread), b"</xp:thread></xp:meta>", payload_xml, MESSAGE_END]
    return b"".join(parts)


def _display_tag(tag: object) -> str:
    if not isinstance(tag, str):
        return "?"
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return f"{local} xmlns={namespace!r}"
    return tag
