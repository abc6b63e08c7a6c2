"""What a handler returns, made into the next hop: written as XML, held to the limits, validated, decoded afresh.

A handler's output is the next hop's input, so it meets everything a client's
message meets: the size and depth bounds, the target's schema, a fresh decode
so no two handlers ever share a mutable object. The pump's own primitives
(``system.*``) are the exception to the last: they hand over what they made
and keep nothing of it, so their outputs are written and checked, not decoded
again (a buffer's outcome holds one result per item). The in-process pump and the
durable engine both prepare outputs here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lxml import etree

from xml_pipeline.message.bounds import refuse_if_beyond
from xml_pipeline.message.envelope import envelope_bytes
from xml_pipeline.message.payload_codec import PayloadCodec, PayloadDecodeError, PayloadTypeError, codec_for
from xml_pipeline.message.safe_xml import XmlLimits, XmlRejected, check_outgoing
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.outcome import Failure
from xml_pipeline.organism import Listener, is_reserved

UNBOUNDED_BYTES = 2**62
"""The size bound of the built-in primitives' outputs: none (see OutputPreparer.beyond_limits)."""
_THREAD_SIZED = "00000000-0000-0000-0000-000000000000"
"""Stands in for a hop's thread when only the envelope's length matters (every thread is a UUID)."""

Prepared = tuple[Any, bytes]
"""A fresh payload instance and its XML."""


class OutputPreparer:
    def __init__(self, limits: XmlLimits) -> None:
        self.limits = limits
        self._limits_of_primitives = replace(limits, max_bytes=UNBOUNDED_BYTES)

    def for_listener(self, target: Listener, payload: Any, sender: str) -> Prepared | Failure:
        """Write ``payload`` as XML for ``target``, hold it to the limits, validate it, decode a fresh copy."""
        codec = target.codecs_by_class.get(type(payload))
        if codec is None and target.accepts_any:
            try:
                codec = codec_for(type(payload))
            except PayloadTypeError as exc:
                return Failure(ErrorCode.BAD_RESPONSE, f"{sender} sent something that cannot travel as XML: {exc}")
        if codec is None:
            kind = type(payload).__name__
            return Failure(
                ErrorCode.BAD_RESPONSE, f"{sender} sent {kind} to {target.name}, which accepts {target.accepted_names}"
            )
        return self._prepared(codec, payload, sender, target.name, validate=True)

    def checked(self, payload: Any, element: etree._Element, sender: str, to: str) -> Prepared | Failure:
        """A payload decoded from ``element``, which the target's schema passed, held to the limits only.

        The caller vouches that ``payload`` is fresh (nobody else holds it) and
        was decoded from ``element`` after validation, as :meth:`for_listener`
        would have made it; only the size and depth bounds remain to check.
        """
        payload_xml = etree.tostring(element)
        beyond = self.beyond_limits(payload_xml, element, sender, to)
        return beyond if beyond is not None else (payload, payload_xml)

    def for_client(self, payload: Any, sender: str, to: str) -> Prepared | Failure:
        """The same for a reply to a client, which has no schema of its own to meet."""
        try:
            codec = codec_for(type(payload))
        except PayloadTypeError as exc:
            return Failure(
                ErrorCode.BAD_RESPONSE, f"{sender} responded with something that cannot travel as XML: {exc}"
            )
        return self._prepared(codec, payload, sender, to, validate=False)

    def _prepared(
        self, codec: PayloadCodec[Any], payload: Any, sender: str, to: str, *, validate: bool
    ) -> Prepared | Failure:
        primitive = is_reserved(sender)
        limits = self._limits_of_primitives if primitive else self.limits
        try:
            refuse_if_beyond(payload, limits)
            element = codec.to_element(payload)
        except XmlRejected as refused:
            return Failure(refused.code, f"{sender}'s output to {to}: {refused.detail}")
        except RecursionError:
            return Failure(ErrorCode.TOO_DEEP, f"{sender}'s output to {to} is nested too deep to be written")
        except PayloadTypeError as exc:
            return Failure(ErrorCode.BAD_RESPONSE, f"{sender} sent an invalid {codec.xml_name}: {exc}")
        payload_xml = etree.tostring(element)
        beyond = self._beyond(payload_xml, element, sender, to, limits)
        if beyond is not None:
            return beyond
        if validate:
            problem = codec.validate(element)
            if problem is not None:
                return Failure(ErrorCode.BAD_RESPONSE, f"{sender} sent an invalid {codec.xml_name}: {problem}")
        if primitive:  # the pump's own primitives keep nothing they send: what they made is nobody else's
            return payload, payload_xml
        try:
            fresh = codec.from_element(element)
        except PayloadDecodeError as exc:
            return Failure(ErrorCode.BAD_RESPONSE, f"{sender} sent an undecodable {codec.xml_name}: {exc}")
        return fresh, payload_xml

    def beyond_limits(self, payload_xml: bytes, element: etree._Element, sender: str, to: str) -> Failure | None:
        """The failure for a handler's output that an incoming message of its size or depth would get.

        The built-in primitives are held to the depth bound only: a buffer's
        outcome gathers one answer per item, each of which met the size bound
        on its own way in, and refusing it would throw away the whole run.
        """
        return self._beyond(
            payload_xml, element, sender, to, self._limits_of_primitives if is_reserved(sender) else self.limits
        )

    def _beyond(
        self, payload_xml: bytes, element: etree._Element, sender: str, to: str, limits: XmlLimits
    ) -> Failure | None:
        try:
            check_outgoing(
                payload_xml, element, limits, envelope_size=lambda: len(envelope_bytes(sender, to, _THREAD_SIZED, b""))
            )
        except XmlRejected as refused:
            return Failure(refused.code, f"{sender}'s output to {to}: {refused.detail}")
        return None
