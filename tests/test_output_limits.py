"""What a handler produces meets the same size and depth bounds as what a client sends."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.daemon_support import running_daemon
from tests.support import Ping, Pong, bloated, echo, envelope, forwarder
from xml_pipeline import ErrorCode, HandlerMetadata, HandlerResponse, SystemErrorPayload
from xml_pipeline.message.envelope import read_envelope
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message.safe_xml import parse_untrusted
from xml_pipeline.message_bus.outcome import Failure
from xml_pipeline.message_bus.outputs import OutputPreparer
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.testing import ask, running

LIMITS = PumpLimits(max_message_bytes=4096, max_depth=6)


@dataclass(frozen=True)
class Leaf:
    text: str


@dataclass(frozen=True)
class Branch:
    leaf: Leaf


@dataclass(frozen=True)
class Trunk:
    branch: Branch


@dataclass(frozen=True)
class Tree:
    trunk: Trunk


@dataclass(frozen=True)
class Forest:
    tree: Tree


@dataclass(frozen=True)
class Node:
    name: str
    children: list[Node] = field(default_factory=list)


async def nests(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Answers a Node nested ``count`` levels deep: past Python's recursion limit for big counts."""
    node = Node("leaf")
    for _ in range(payload.count):
        node = Node("x", [node])
    return HandlerResponse.respond(node)


async def towering(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Answers <Forest><tree><trunk><branch><leaf><text>: with <message>, 7 levels, one more than allowed."""
    return HandlerResponse.respond(Forest(Tree(Trunk(Branch(Leaf(payload.text))))))


async def catches_errors(payload: Ping | Pong | SystemErrorPayload, metadata: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, Ping):
        return HandlerResponse(payload, to="bloater")
    if isinstance(payload, SystemErrorPayload):
        return HandlerResponse.respond(Pong(f"caught {payload.code.value}"))
    return HandlerResponse.respond(payload)


@pytest.fixture
async def pump() -> AsyncIterator[Pump]:
    organism = Organism.of(
        "limits",
        [
            Listener("bloater", [Ping], bloated, peers=[]),
            Listener("tower", [Ping], towering, peers=[]),
            Listener("nester", [Ping], nests, peers=[]),
            Listener("relay", [Ping, Pong], forwarder("bloater"), peers=["bloater"]),
            Listener("catcher", [Ping, Pong, SystemErrorPayload], catches_errors, peers=["bloater"]),
            Listener("echo", [Ping], echo, peers=[]),
            Listener("cpu-bloater", [Ping], bloated, cpu_bound=True, peers=[]),
        ],
        LIMITS,
    )
    organism.settings = {"process_pool": {"workers": 1}}
    async with running(organism) as started:
        yield started


async def test_output_within_the_limit_is_delivered(pump: Pump) -> None:
    reply = await ask(pump, Ping("ok", count=3000), to="bloater")
    assert reply.payload == Pong("x" * 3000)


@pytest.mark.parametrize("target", ["bloater", "relay"])
async def test_oversized_output_is_refused_and_its_caller_told(
    pump: Pump, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline.pump")
    submission = await pump.inject_payload(Ping("big", count=100_000), target)
    reply = await submission.next_reply(5)
    assert reply.error_code is ErrorCode.TOO_LARGE, reply.payload
    assert isinstance(reply.payload, SystemErrorPayload)
    assert reply.payload.listener == "bloater"
    assert "the limit is 4096" in reply.payload.message
    assert await submission.collect(5) == []
    assert any("code=too-large listener=bloater" in r.getMessage() for r in caplog.records)
    assert (await ask(pump, Ping("still here"), to="echo")).payload == Pong("still here")


async def test_a_caller_that_accepts_errors_gets_the_refusal(pump: Pump) -> None:
    reply = await ask(pump, Ping("big", count=100_000), to="catcher")
    assert reply.payload == Pong("caught too-large")


async def test_output_deeper_than_the_limit_is_refused(pump: Pump) -> None:
    reply = await ask(pump, Ping("deep"), to="tower")
    assert reply.error_code is ErrorCode.TOO_DEEP, reply.payload


@pytest.mark.parametrize("depth", [20, 5000])
async def test_output_nested_past_the_limit_or_past_recursion_is_too_deep(pump: Pump, depth: int) -> None:
    reply = await ask(pump, Ping("deep", count=depth), to="nester")
    assert reply.error_code is ErrorCode.TOO_DEEP, reply.payload


def test_a_huge_output_is_refused_before_it_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its text alone passes the bound, so no tree or bytes of it are ever made."""
    written: list[object] = []
    codec = codec_for(Pong)
    monkeypatch.setattr(codec, "to_element", lambda payload: written.append(payload))
    prepared = OutputPreparer(LIMITS.xml_limits()).for_client(Pong("x" * 100_000), "bloater", "console")
    assert isinstance(prepared, Failure)
    assert prepared.code is ErrorCode.TOO_LARGE
    assert written == []


async def test_oversized_output_of_a_cpu_bound_handler_is_refused(pump: Pump) -> None:
    reply = await ask(pump, Ping("big", count=100_000), to="cpu-bloater", timeout=30)
    assert reply.error_code is ErrorCode.TOO_LARGE, reply.payload
    fits = await ask(pump, Ping("fits", count=1000), to="cpu-bloater", timeout=30)
    assert fits.payload == Pong("x" * 1000)


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def test_a_60_mb_answer_is_refused_and_the_daemon_gives_the_memory_back() -> None:
    """The example's exclaimer appends as many marks as asked: 60 million of them must not become a reply."""
    greeting = "<Greeting><name>Ada</name><excitement>{}</excitement></Greeting>"
    with running_daemon(ROOT / "organism.yaml") as daemon:
        for _ in range(20):  # warm up: imports, schemas, allocator pools
            assert daemon.client.send(_envelope(greeting.format(2)), wait="end", timeout=10).status == 200
        baseline = _rss_kib(daemon.process.pid)
        answer = daemon.client.send(_envelope(greeting.format(60_000_000)), wait="end", timeout=60)
        assert answer.status == 200, answer.body
        [envelope] = answer.json()["replies"]
        error = read_envelope(parse_untrusted(envelope.encode())).payload
        assert error.findtext("code") == "too-large", envelope
        assert error.findtext("listener") == "exclaimer"
        after = _rss_kib(daemon.process.pid)
        assert after - baseline < 30 * 1024, f"RSS went from {baseline} KiB to {after} KiB"
        assert daemon.client.send(_envelope(greeting.format(1)), wait="end", timeout=10).status == 200


def _envelope(payload: str) -> bytes:
    return envelope(payload.replace("<Greeting>", '<Greeting xmlns="">'), to="greeter")
