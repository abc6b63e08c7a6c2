"""Every failure a sender can cause gets a SystemError, one log line, and the pump goes on."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from tests.support import THREAD, Ping, Pong, echo, envelope, misbehaving_organism, ping_xml
from xml_pipeline import ErrorCode, SystemErrorPayload
from xml_pipeline.message.envelope import ENVELOPE_NS, read_envelope
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message.safe_xml import parse_untrusted
from xml_pipeline.message_bus.conversations import Reply
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.organism import PumpLimits
from xml_pipeline.testing import ask, running

LIMITS = PumpLimits(max_message_bytes=4096, max_depth=16)

XXE = (
    '<?xml version="1.0"?><!DOCTYPE message [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    + envelope("<Ping><text>&x;</text></Ping>").decode()
).encode()
BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
    + "]>"
    + envelope("<Ping><text>&lol9;</text></Ping>").decode()
).encode()
NETWORK_DTD = ('<!DOCTYPE message SYSTEM "http://127.0.0.1:9/evil.dtd">' + envelope(ping_xml()).decode()).encode()
HIDDEN_DTD = (
    '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE m [<!ENTITY x "y">]>' + envelope(ping_xml()).decode()
).encode("utf-16")

INGRESS_CASES = {
    "malformed": (b"<message><meta><from>console</from>", ErrorCode.MALFORMED_XML),
    "not xml at all": (b"\x00\xff\xfe garbage", ErrorCode.MALFORMED_XML),
    "empty": (b"", ErrorCode.MALFORMED_XML),
    "undeclared entity": (envelope("<Ping><text>&nope;</text></Ping>"), ErrorCode.MALFORMED_XML),
    "wrong root": (
        envelope(ping_xml()).replace(b"<message ", b"<msg ").replace(b"</message>", b"</msg>"),
        ErrorCode.ENVELOPE_INVALID,
    ),
    "wrong namespace": (
        envelope(ping_xml()).replace(ENVELOPE_NS.encode(), b"urn:someone-else"),
        ErrorCode.ENVELOPE_INVALID,
    ),
    "no namespace": (envelope(ping_xml()).replace(f' xmlns="{ENVELOPE_NS}"'.encode(), b""), ErrorCode.ENVELOPE_INVALID),
    "missing from": (envelope(ping_xml()).replace(b"<from>console</from>", b""), ErrorCode.ENVELOPE_INVALID),
    "missing thread": (
        envelope(ping_xml()).replace(f"<thread>{THREAD}</thread>".encode(), b""),
        ErrorCode.ENVELOPE_INVALID,
    ),
    "thread not a uuid": (envelope(ping_xml(), thread="1; DROP TABLE"), ErrorCode.ENVELOPE_INVALID),
    "missing to": (envelope(ping_xml()).replace(b"<to>echo</to>", b""), ErrorCode.ENVELOPE_INVALID),
    "two payloads": (envelope(ping_xml() + ping_xml()), ErrorCode.ENVELOPE_INVALID),
    "no payload": (envelope(""), ErrorCode.ENVELOPE_INVALID),
    "payload in envelope namespace": (envelope("<Ping><text>x</text></Ping>"), ErrorCode.ENVELOPE_INVALID),
    "unknown target": (envelope(ping_xml(), to="nobody"), ErrorCode.UNKNOWN_TARGET),
    "payload the target does not accept": (envelope('<Pong xmlns=""><text>x</text></Pong>'), ErrorCode.PAYLOAD_INVALID),
    "field of the wrong type": (
        envelope('<Ping xmlns=""><text>x</text><count>many</count></Ping>'),
        ErrorCode.PAYLOAD_INVALID,
    ),
    "required field missing": (envelope('<Ping xmlns=""><count>1</count></Ping>'), ErrorCode.PAYLOAD_INVALID),
    "unexpected field": (envelope('<Ping xmlns=""><text>x</text><evil>1</evil></Ping>'), ErrorCode.PAYLOAD_INVALID),
    "peer not allowed": (envelope(ping_xml(), sender="mute", to="raiser"), ErrorCode.PEER_NOT_ALLOWED),
    "oversized": (envelope(f'<Ping xmlns=""><text>{"x" * 5000}</text></Ping>'), ErrorCode.TOO_LARGE),
    "too deep": (envelope('<Ping xmlns=""><text>x</text>' + "<a>" * 40 + "</a>" * 40 + "</Ping>"), ErrorCode.TOO_DEEP),
    "deeper than libxml2 allows": (envelope("<a>" * 300 + "</a>" * 300), ErrorCode.TOO_DEEP),
    "xxe": (XXE, ErrorCode.FORBIDDEN_DTD),
    "billion laughs": (BILLION_LAUGHS, ErrorCode.FORBIDDEN_DTD),
    "external dtd over the network": (NETWORK_DTD, ErrorCode.FORBIDDEN_DTD),
    "dtd hidden behind utf-16": (HIDDEN_DTD, ErrorCode.FORBIDDEN_DTD),
}


@pytest.fixture
async def pump() -> AsyncIterator[Pump]:
    async with running(misbehaving_organism(LIMITS)) as started:
        yield started


def assert_proper_error(reply: Reply, code: ErrorCode) -> SystemErrorPayload:
    """The error is a SystemErrorPayload in a valid envelope from 'system'."""
    assert isinstance(reply.payload, SystemErrorPayload), reply.payload
    assert reply.payload.code is code, reply.payload
    assert reply.payload.retry_allowed is code.retry_allowed
    parsed = read_envelope(parse_untrusted(reply.envelope))
    assert parsed.sender == "system"
    codec = codec_for(SystemErrorPayload)
    assert codec.validate(parsed.payload) is None
    assert codec.from_element(parsed.payload) == reply.payload
    return reply.payload


async def assert_still_serving(pump: Pump) -> None:
    reply = await ask(pump, Ping("still there?"), to="echo")
    assert reply.payload == Pong("still there?")


def pump_log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "xml_pipeline.pump" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("raw", "code"), list(INGRESS_CASES.values()), ids=list(INGRESS_CASES))
async def test_bad_ingress_gets_system_error_and_pump_goes_on(
    pump: Pump, caplog: pytest.LogCaptureFixture, raw: bytes, code: ErrorCode
) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline.pump")
    submission = await pump.inject(raw)
    error = assert_proper_error(await submission.next_reply(5), code)
    assert error.message
    lines = pump_log_lines(caplog)
    assert len(lines) == 1, lines
    assert code.value in lines[0]
    await assert_still_serving(pump)


async def test_error_is_addressed_to_sender_on_its_thread(pump: Pump) -> None:
    submission = await pump.inject(envelope(ping_xml(), to="nobody", sender="alice"))
    reply = await submission.next_reply(5)
    assert (reply.to, reply.thread, submission.thread_id) == ("alice", THREAD, THREAD)


HANDLER_CASES = {
    "handler raises": ("raiser", ErrorCode.HANDLER_ERROR, "RuntimeError: cannot handle"),
    "handler hangs past its timeout": ("hanger", ErrorCode.HANDLER_TIMEOUT, "did not finish within 0.2s"),
    "handler returns a wrong type": ("liar", ErrorCode.BAD_RESPONSE, "returned str"),
    "handler forwards to an unknown listener": ("lost", ErrorCode.UNKNOWN_TARGET, "'ghost'"),
    "handler forwards to a listener outside its peers": ("mute", ErrorCode.PEER_NOT_ALLOWED, "may not send to 'echo'"),
    "handler responds with a payload its caller does not accept": (
        "asker",
        ErrorCode.BAD_RESPONSE,
        "accepts Ping, Pong",
    ),
}


@pytest.mark.parametrize(("target", "code", "detail"), list(HANDLER_CASES.values()), ids=list(HANDLER_CASES))
async def test_handler_failures_reach_the_client(
    pump: Pump, caplog: pytest.LogCaptureFixture, target: str, code: ErrorCode, detail: str
) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline.pump")
    submission = await pump.inject_payload(Ping("boom"), target)
    reply = await submission.next_reply(5)
    error = assert_proper_error(reply, code)
    assert detail in error.message
    assert reply.thread == submission.thread_id
    assert await submission.collect(5) == []
    lines = pump_log_lines(caplog)
    assert len(lines) == 1, lines
    await assert_still_serving(pump)
    assert pump.registry.debug_dump() == {}


async def test_errors_go_to_a_caller_that_accepts_them(pump: Pump) -> None:
    """guardian accepts SystemErrorPayload, so raiser's failure reaches guardian, not the client."""
    reply = await ask(pump, Ping("x"), to="guardian")
    assert reply.payload == Pong("recovered from handler-error")


async def test_names_with_dots_route_both_ways(pump: Pump) -> None:
    pump.register_generic_listener("system.echo", echo, [Ping], peers=[])
    reply = await ask(pump, Ping("dotted"), to="team.alpha")
    assert reply.payload == Pong("dotted")
    assert reply.sender == "team.alpha"


async def test_empty_peers_means_respond_only(pump: Pump) -> None:
    reply = await ask(pump, Ping("a"), to="echo")  # echo has peers=[] and only responds
    assert reply.payload == Pong("a")
    reply = await ask(pump, Ping("b"), to="mute")  # mute has peers=[] and tries to forward
    assert reply.error_code is ErrorCode.PEER_NOT_ALLOWED
