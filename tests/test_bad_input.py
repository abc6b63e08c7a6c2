"""Every failure a sender can cause gets a SystemError, one log line, and the pump goes on."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fixtures.bad_payloads import HOSTILE_ENVELOPES, doctype_naming
from tests.support import THREAD, Ping, Pong, echo, envelope, misbehaving_organism, ping_xml
from xml_pipeline import ErrorCode, SystemErrorPayload
from xml_pipeline.message.envelope import read_envelope
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message.safe_xml import XmlLimits, XmlRejected, parse_checked, parse_untrusted
from xml_pipeline.message_bus.conversations import Reply
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.organism import PumpLimits
from xml_pipeline.testing import ask, running

LIMITS = PumpLimits(max_message_bytes=4096, max_depth=16)

REFUSED = {name: case for name, case in HOSTILE_ENVELOPES.items() if case[1] is not None}
SERVED = {name: raw for name, (raw, code) in HOSTILE_ENVELOPES.items() if code is None}


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


@pytest.mark.parametrize(("raw", "code"), list(REFUSED.values()), ids=list(REFUSED))
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


@pytest.mark.parametrize("raw", list(SERVED.values()), ids=list(SERVED))
async def test_inputs_that_only_look_hostile_are_served(pump: Pump, raw: bytes) -> None:
    submission = await pump.inject(raw)
    reply = await submission.next_reply(5)
    assert isinstance(reply.payload, Pong), reply.payload


def test_utf16_declared_without_its_byte_order_mark_says_so() -> None:
    raw, _ = HOSTILE_ENVELOPES["ascii bytes declaring utf-16 without a byte order mark"]
    with pytest.raises(XmlRejected, match="UTF-16 needs its byte order mark") as caught:
        parse_untrusted(raw)
    assert caught.value.code is ErrorCode.UNSUPPORTED_ENCODING


async def test_text_that_looks_like_a_doctype_reaches_the_handler_as_text(pump: Pump) -> None:
    raw = envelope('<Ping xmlns=""><text><![CDATA[<!DOCTYPE html>]]></text></Ping>')
    reply = await (await pump.inject(raw)).next_reply(5)
    assert reply.payload == Pong("<!DOCTYPE html>")


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


async def test_the_log_line_of_an_error_names_the_thread_its_client_sees(
    pump: Pump, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline.pump")
    submission = await pump.inject_payload(Ping("x"), "lost")  # lost forwards to a listener that does not exist
    reply = await submission.next_reply(5)
    assert reply.error_code is ErrorCode.UNKNOWN_TARGET
    [line] = pump_log_lines(caplog)
    assert f"conversation={reply.thread}" in line


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


def _unblock_reader(fifo: Path) -> None:
    """Open the FIFO's write end once, so a parser stuck opening it can return and the test can fail."""
    with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):
        pass


@pytest.mark.parametrize("encoding", ["UTF-7", "UTF-8", "UTF-16", "UTF-32", "IBM037"])
@pytest.mark.parametrize("repair", [False, True], ids=["strict", "repairing"])
async def test_a_doctype_naming_a_fifo_is_refused_without_opening_it(
    tmp_path: Path, encoding: str, repair: bool
) -> None:
    """Opening a FIFO blocks until a writer comes: a parser that tries would never return."""
    fifo = tmp_path / "no-writer-ever"
    os.mkfifo(fifo)
    raw = doctype_naming(str(fifo), encoding=encoding)
    parsing = asyncio.ensure_future(asyncio.to_thread(parse_checked, raw, XmlLimits(repair=repair)))
    done, _ = await asyncio.wait({parsing}, timeout=5)
    if not done:
        _unblock_reader(fifo)
        await parsing
        pytest.fail("the parser opened the FIFO named in the DOCTYPE")
    with pytest.raises(XmlRejected) as refused:
        parsing.result()
    assert refused.value.code in {ErrorCode.FORBIDDEN_DTD, ErrorCode.UNSUPPORTED_ENCODING}


async def test_a_doctype_naming_a_missing_file_is_refused_not_served(pump: Pump, tmp_path: Path) -> None:
    """Before the fix a DTD that named a file that does not exist was skipped and the message served."""
    for encoding in ("UTF-7", "UTF-8"):
        submission = await pump.inject(doctype_naming(str(tmp_path / "absent.dtd"), encoding=encoding))
        reply = await submission.next_reply(5)
        assert reply.error_code in {ErrorCode.FORBIDDEN_DTD, ErrorCode.UNSUPPORTED_ENCODING}, reply.payload


REPAIR_REFUSES = {
    "undeclared entity": (envelope('<Ping xmlns=""><text>&xxe;</text></Ping>'), ErrorCode.MALFORMED_XML),
    "doctype after the root": (
        envelope(ping_xml()) + b'<!DOCTYPE message SYSTEM "file:///etc/passwd">',
        ErrorCode.FORBIDDEN_DTD,
    ),
    "control character reference": (envelope('<Ping xmlns=""><text>&#x1;</text></Ping>'), ErrorCode.MALFORMED_XML),
}


@pytest.mark.parametrize(("raw", "code"), list(REPAIR_REFUSES.values()), ids=list(REPAIR_REFUSES))
async def test_repair_never_guesses_at_entities_characters_or_declarations(raw: bytes, code: ErrorCode) -> None:
    """pump.repair mends well-formedness slips, not these: each is refused as it would be without repair."""
    async with running(misbehaving_organism(PumpLimits(repair=True))) as repairing:
        reply = await (await repairing.inject(raw)).next_reply(5)
        assert reply.error_code is code, reply.payload
        mended = await (await repairing.inject(envelope('<Ping xmlns=""><text>x</text></Ping>')[:-10])).next_reply(5)
        assert mended.payload == Pong("x")  # a truncated end tag is still repaired
