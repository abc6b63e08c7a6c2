"""Clients are never listeners: forged senders and closed listeners are refused on every ingress."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.daemon_support import cli, running_daemon
from tests.support import Ping, Pong, echo, envelope, ping_xml
from xml_pipeline import HandlerMetadata, HandlerResponse
from xml_pipeline.message.safe_xml import parse_untrusted
from xml_pipeline.message.system_payloads import ErrorCode, SystemErrorPayload
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.testing import running

EXAMPLE = ROOT / "organism.yaml"
FORGED_SENDERS = ["shouter", "system", "system.buffer.6f1c2a9e0b7d4e7a9a516d2b8f1c0e42"]
EXCLAIM = '<Exclaim xmlns=""><text>hi</text></Exclaim>'
GREETING = '<Greeting xmlns=""><name>Ada</name></Greeting>'


def recording_organism(calls: list[str]) -> Organism:
    async def record(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        calls.append(metadata.from_id)
        return HandlerResponse.respond(Pong(payload.text))

    return Organism.of(
        "guarded",
        [
            Listener("front", [Ping], record, ingress=True, peers=["back"]),
            Listener("back", [Ping], record, peers=[]),
            Listener("other", [Ping], echo, ingress=True, peers=[]),
        ],
    )


@pytest.mark.parametrize("sender", ["front", "back", "system", "system.buffer", "system.buffer.6f1c2a9e"])
async def test_a_client_sending_as_a_listener_or_system_is_refused_and_no_handler_runs(sender: str) -> None:
    calls: list[str] = []
    async with running(recording_organism(calls)) as pump:
        submission = await pump.inject(envelope(ping_xml(), sender=sender, to="front"), access=ClientAccess.anonymous())
        reply = await submission.next_reply(5)
        assert isinstance(reply.payload, SystemErrorPayload)
        assert reply.payload.code is ErrorCode.SENDER_FORBIDDEN
        assert pump.stats().conversations == 0
    assert calls == []


async def test_listeners_are_closed_to_clients_unless_marked_ingress() -> None:
    calls: list[str] = []
    async with running(recording_organism(calls)) as pump:
        closed = await pump.inject(envelope(ping_xml(), to="back"), access=ClientAccess.anonymous())
        reply = await closed.next_reply(5)
        assert isinstance(reply.payload, SystemErrorPayload)
        assert reply.payload.code is ErrorCode.TARGET_FORBIDDEN
        assert "ingress: true" in reply.payload.message
        opened = await pump.inject(envelope(ping_xml(), to="front"), access=ClientAccess.anonymous())
        assert (await opened.next_reply(5)).payload == Pong("hi")
    assert calls == ["console"]


async def test_a_token_narrows_the_listeners_open_to_clients_and_fixes_the_sender() -> None:
    calls: list[str] = []
    alice = ClientAccess.authenticated("alice", frozenset({"front", "back"}))
    async with running(recording_organism(calls)) as pump:
        outcomes = {}
        for to, sender in (("front", "alice"), ("other", "alice"), ("back", "alice"), ("front", "bob")):
            submission = await pump.inject(envelope(ping_xml(), sender=sender, to=to), access=alice)
            reply = await submission.next_reply(5)
            outcomes[to, sender] = reply.error_code or type(reply.payload).__name__
    assert outcomes == {
        ("front", "alice"): "Pong",
        ("other", "alice"): ErrorCode.TARGET_FORBIDDEN,  # open to clients, but not granted
        ("back", "alice"): ErrorCode.TARGET_FORBIDDEN,  # granted, but closed to clients
        ("front", "bob"): ErrorCode.SENDER_FORBIDDEN,  # not the token's identity
    }
    assert calls == ["alice"]


def _code_of(reply_envelope: str) -> str | None:
    return parse_untrusted(reply_envelope.encode()).findtext(".//code")


def _forged(sender: str, to: str, payload: str) -> bytes:
    return envelope(payload, sender=sender, to=to)


def test_forged_senders_are_refused_over_http_and_by_send_and_the_listener_is_never_called() -> None:
    with running_daemon(EXAMPLE) as daemon:
        for sender in FORGED_SENDERS:
            for to, payload in (("exclaimer", EXCLAIM), ("greeter", GREETING)):
                answer = daemon.client.send(_forged(sender, to, payload), wait="end", timeout=5)
                assert answer.status == 403, answer.body
                assert answer.json()["error"]["code"] == "sender-forbidden"
            sent = cli("send", "--socket", str(daemon.socket_path), "--sender", sender, "exclaimer", EXCLAIM)
            assert sent.returncode == 1, sent.stderr
            assert "sender-forbidden" in sent.stdout + sent.stderr
        closed = daemon.client.send(_forged("console", "exclaimer", EXCLAIM), wait="end", timeout=5)
        assert closed.status == 403
        assert closed.json()["error"]["code"] == "target-forbidden"
        metrics = daemon.client.metrics()
        assert 'xml_pipeline_messages_in_total{listener="exclaimer"}' not in metrics
        assert 'xml_pipeline_messages_in_total{listener="greeter"}' not in metrics
        assert daemon.stop() == 0
        log = daemon.log()
    for sender in FORGED_SENDERS:
        assert re.search(rf"code=sender-forbidden .*from={re.escape(sender)}:", log), sender


def test_forged_senders_are_refused_by_run_stdin() -> None:
    lines = [_forged(sender, "exclaimer", EXCLAIM).decode() for sender in FORGED_SENDERS]
    lines.append("exclaimer " + EXCLAIM)  # a client's name, but a listener closed to clients
    result = cli("run", "organism.yaml", "--stdin", stdin="\n".join(lines) + "\n")
    codes = sorted(_code_of(line) or "" for line in result.stdout.splitlines())
    assert codes == ["sender-forbidden"] * 3 + ["target-forbidden"], result.stdout
    assert "Exclaimed" not in result.stdout
    assert result.stderr.count("code=sender-forbidden") == 3


def test_check_says_when_no_listener_is_open_to_clients(tmp_path: Path) -> None:
    closed = EXAMPLE.read_text().replace("ingress: true", "ingress: false")
    (tmp_path / "organism.yaml").write_text(closed)
    result = cli("check", str(tmp_path / "organism.yaml"))
    assert result.returncode == 0
    assert "0 open to clients" in result.stdout
    assert "no listener says 'ingress: true'" in result.stderr
