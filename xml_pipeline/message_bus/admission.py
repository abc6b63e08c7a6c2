"""Pipeline steps 1-6 for a client's bytes: limits, parse, envelope, sender, target, payload.

Pure: it reads the listener table and the limits, touches no state, and
answers either the admitted message or the refusal to send back. The
in-process pump and the durable (Redis Streams) engine both admit through it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from xml_pipeline.message.envelope import Envelope, best_effort_origin, read_envelope
from xml_pipeline.message.payload_codec import PayloadDecodeError
from xml_pipeline.message.safe_xml import XmlLimits, XmlRejected, parse_checked
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.outcome import Refusal
from xml_pipeline.organism import Listener

log = logging.getLogger("xml_pipeline.pump")


@dataclass(frozen=True, slots=True)
class Admitted:
    listener: Listener
    payload: Any
    payload_xml: bytes
    envelope: Envelope


def admit(raw: bytes, listeners: Mapping[str, Listener], limits: XmlLimits, access: ClientAccess) -> Admitted | Refusal:
    """Check ``raw`` as a message from the client ``access`` describes; never raises for bad input.

    A client is never a listener: a ``from`` naming one (or ``system``) is
    refused, and only listeners open to this client may be its target.
    """
    try:
        parsed = parse_checked(raw, limits)
    except XmlRejected as rejected:
        return Refusal(rejected.code, rejected.detail)
    if parsed.repairs:
        log.warning("message repaired before use: %s", "; ".join(parsed.repairs))
    try:
        envelope = read_envelope(parsed.root)
    except XmlRejected as rejected:
        return Refusal(rejected.code, rejected.detail, *best_effort_origin(parsed.root))
    sender, thread, to = envelope.sender, envelope.thread, envelope.to
    if to is None:
        return Refusal(ErrorCode.ENVELOPE_INVALID, "<meta> has no <to>: say which listener it is for", sender, thread)
    forged = access.sender_refusal(sender, listeners)
    if forged is not None:
        return Refusal(ErrorCode.SENDER_FORBIDDEN, forged, sender, thread, to)
    listener = listeners.get(to)
    if listener is None:
        return Refusal(ErrorCode.UNKNOWN_TARGET, f"no listener is named {to!r}", sender, thread, to)
    closed = access.target_refusal(listener)
    if closed is not None:
        return Refusal(ErrorCode.TARGET_FORBIDDEN, closed, sender, thread, to)
    codec = listener.codecs_by_tag.get(envelope.payload.tag)
    if codec is None:
        name = etree.QName(envelope.payload).localname
        detail = f"{to!r} accepts {listener.accepted_names}, not <{name}>"
        return Refusal(ErrorCode.PAYLOAD_INVALID, detail, sender, thread, to)
    problem = codec.validate(envelope.payload)
    if problem is not None:
        return Refusal(ErrorCode.PAYLOAD_INVALID, f"<{codec.xml_name}>: {problem}", sender, thread, to)
    try:
        payload = codec.from_element(envelope.payload)
    except PayloadDecodeError as exc:
        return Refusal(ErrorCode.PAYLOAD_INVALID, str(exc), sender, thread, to)
    return Admitted(listener, payload, etree.tostring(envelope.payload), envelope)
