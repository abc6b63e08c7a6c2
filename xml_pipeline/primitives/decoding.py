"""Turning the XML text carried in SequenceStart and BufferStart into a target's payload."""

from __future__ import annotations

from typing import Any

from lxml import etree

from xml_pipeline.message.payload_codec import PayloadDecodeError, codec_for
from xml_pipeline.message.safe_xml import XmlLimits, XmlRejected, parse_checked
from xml_pipeline.organism import Listener


def decode_for(listener: Listener, text: str, limits: XmlLimits) -> Any:
    """The payload ``listener`` accepts from ``text``; ValueError with a plain reason otherwise."""
    return checked_for(listener, text, limits)[0]


def checked_for(listener: Listener, text: str, limits: XmlLimits) -> tuple[Any, etree._Element]:
    """:func:`decode_for`, and the element the payload was decoded from, which ``listener``'s schema passed."""
    try:
        element = parse_checked(text.strip().encode(), limits).root
    except XmlRejected as exc:
        raise ValueError(f"{exc.code.value}: {exc.detail}") from None
    codec = listener.codecs_by_tag.get(element.tag)
    if codec is None:
        raise ValueError(f"{listener.name} accepts {listener.accepted_names}, not <{etree.QName(element).localname}>")
    problem = codec.validate(element)
    if problem is not None:
        raise ValueError(f"<{codec.xml_name}>: {problem}")
    try:
        return codec.from_element(element), element
    except PayloadDecodeError as exc:
        raise ValueError(str(exc)) from None


def encode(payload: Any) -> str:
    return codec_for(type(payload)).to_bytes(payload).decode()
