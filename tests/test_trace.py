"""Conversation traces: the call tree, errors on their hop, the bounds, retention, and every backend."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.daemon_support import cli, running_daemon, wait_until, write_organism
from tests.redis_server import RedisServer
from tests.support import Ping
from workers.hello import Greeting
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.observe.events import Observation
from xml_pipeline.observe.memory_store import MemoryTraceStore
from xml_pipeline.observe.redis_store import RedisTraceStore
from xml_pipeline.observe.settings import ObserveSettings
from xml_pipeline.observe.trace import assemble, render
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.testing import running

GREETING_PATH = [
    ("console", "greeter"),
    ("greeter", "shouter"),
    ("shouter", "exclaimer"),
    ("exclaimer", "shouter"),
    ("shouter", "greeter"),
    ("greeter", "console"),
]
FAILING = """
  - name: failing
    payload_class: tests.support.Ping
    handler: tests.cpu_handlers.explode
    ingress: true
    peers: []
"""


def chain_of(trace: dict[str, Any]) -> list[tuple[str, str]]:
    """The hops from the root down its only branch (the greeting never fans out)."""
    (hop,) = trace["hops"]
    path = []
    while True:
        path.append((hop["from"], hop["to"]))
        if not hop["children"]:
            return path
        (hop,) = hop["children"]


def send(daemon_socket: Path, target: str, payload: str) -> str:
    sent = cli("send", target, payload, "--socket", str(daemon_socket))
    return sent.stderr.split()[1].rstrip(":")


def test_trace_of_the_greeting_shows_the_call_tree_with_latencies() -> None:
    with running_daemon(ROOT / "organism.yaml") as daemon:
        thread = send(daemon.socket_path, "greeter", "<Greeting><name>Ada</name></Greeting>")
        as_json = cli("trace", thread, "--json", "--xml", "--socket", str(daemon.socket_path))
        as_text = cli("trace", thread, "--socket", str(daemon.socket_path))
    assert as_json.returncode == 0, as_json.stderr
    trace = json.loads(as_json.stdout)
    assert trace["ended"] is not None
    assert chain_of(trace) == GREETING_PATH
    hop, handled = trace["hops"][0], []
    while hop["children"]:
        assert len(hop["handled"]) == 1
        assert hop["handled"][0]["error"] == ""
        handled.append(hop["handled"][0]["seconds"])
        (hop,) = hop["children"]
    assert len(handled) == 5
    assert all(seconds >= 0 for seconds in handled)
    assert "<GreetingReply><text>HELLO, ADA!</text></GreetingReply>" in hop["xml"]
    lines = as_text.stdout.splitlines()
    assert as_text.returncode == 0
    assert "ended" in lines[0]
    assert [line.split()[:3] for line in lines[1:]] == [[sender, "→", to] for sender, to in GREETING_PATH]
    assert all("handled in" in line and " ms" in line for line in lines[1:-1])
    assert "to the client" in lines[-1]


async def test_an_error_hop_shows_its_code_and_the_error_going_back() -> None:
    organism = Organism.of("errors", [Listener("failing", [Ping], _explode, peers=[])])
    store = MemoryTraceStore(ObserveSettings())
    async with running(organism) as pump:
        pump.observe.attach(store)
        submission = await pump.inject_payload(Ping("x"), "failing")
        await submission.collect(5)
    stored = await store.trace(submission.thread_id)
    assert stored is not None
    trace = assemble(submission.thread_id, stored.records, stored.dropped, with_xml=False)
    (hop,) = trace["hops"]
    assert (hop["from"], hop["to"]) == ("console", "failing")
    assert hop["handled"][0]["error"] == "handler-error"
    assert hop["errors"][0]["code"] == "handler-error"
    ((sent_back),) = hop["children"]
    assert (sent_back["from"], sent_back["to"], sent_back["type"]) == (
        "system",
        "console",
        "xml_pipeline.message.system_payloads:SystemErrorPayload",
    )
    assert any("failed handler-error after" in line for line in render(trace))


async def _explode(payload: Ping, metadata: Any) -> Any:
    raise ValueError("boom")


def test_trace_is_kept_for_its_retention_then_gone_and_memory_back_to_baseline(tmp_path: Path) -> None:
    organism = write_organism(tmp_path / "organism.yaml", pump="observe:\n  trace_retention_seconds: 1\n")
    with running_daemon(organism) as daemon:
        baseline = daemon.client.status()["observe"]
        assert (baseline["traces"], baseline["trace_bytes"]) == (0, 0)
        thread = send(daemon.socket_path, "greeter", "<Greeting><name>Ada</name></Greeting>")
        assert daemon.client.trace(thread, with_xml=False).status == 200
        assert daemon.client.status()["observe"]["trace_bytes"] > 0
        assert wait_until(lambda: daemon.client.trace(thread, with_xml=False).status == 404, timeout=10)
        after = daemon.client.status()["observe"]
    assert (after["traces"], after["trace_bytes"]) == (0, 0)


def test_tracing_can_be_turned_off(tmp_path: Path) -> None:
    organism = write_organism(tmp_path / "organism.yaml", pump="observe:\n  trace_retention_seconds: 0\n")
    with running_daemon(organism) as daemon:
        thread = send(daemon.socket_path, "greeter", "<Greeting><name>Ada</name></Greeting>")
        refused = cli("trace", thread, "--socket", str(daemon.socket_path))
        assert daemon.client.status()["observe"]["tracing"] is False
    assert refused.returncode == 1
    assert "tracing is off" in refused.stderr


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_memory_store_is_bounded_by_count_bytes_and_time(example_organism: Organism) -> None:
    clock = Clock()
    settings = ObserveSettings(trace_retention_seconds=60, trace_max_conversations=3, trace_max_bytes=2048)
    store = MemoryTraceStore(settings, clock=clock)
    async with running(example_organism) as pump:
        pump.observe.attach(store)
        threads = []
        for name in ("a", "b", "c", "d"):
            submission = await pump.inject_payload(Greeting(name), "greeter")
            await submission.collect(5)
            threads.append(submission.thread_id)
        assert await store.trace(threads[0]) is None  # the oldest made room for the fourth
        assert store.stats()["traces"] == 3
        big = await pump.inject_payload(Greeting("x" * 3000), "greeter")
        await big.collect(5)
    stored = await store.trace(big.thread_id)
    assert stored is not None
    assert stored.dropped > 0
    assert sum(len(record.get("xml", "")) for record in stored.records) <= settings.trace_max_bytes
    clock.now += 61
    store.expire()
    assert store.stats()["traces"] == 0
    assert store.size == 0


async def test_a_trace_summary_counts_what_the_trace_could_not_keep() -> None:
    store = MemoryTraceStore(ObserveSettings(trace_max_bytes=1024))
    store.hop(("hop", "a", "", "c", "console", "big", "t", "Big", b"x" * 2000, 1.0))  # too big: counted only
    store.hop(("hop", "b", "", "c", "console", "small", "t", "Small", b"<Small/>", 2.0))
    store.error(("error", "b", "c", "small", "handler-error", "boom", 3.0))
    store.error(("error", "b", "c", "small", "handler-error", "x" * 2000, 4.0))  # too big: counted only
    store.ended("c", 5.0)
    (summary,) = await store.recent(10)
    assert (summary["from"], summary["to"], summary["hops"], summary["errors"]) == ("console", "big", 2, 2)
    assert (summary["started"], summary["ended"]) == (1.0, 5.0)
    stored = await store.trace("c")
    assert stored is not None
    assert stored.dropped == 2
    assert [record["k"] for record in stored.records] == ["hop", "error", "end"]


@pytest.mark.parametrize("kind", ["manager", "redis"])
async def test_every_backend_keeps_traces(
    kind: str, request: pytest.FixtureRequest, example_organism: Organism
) -> None:
    """Memory and manager keep them in the daemon; Redis keeps them where every daemon reads them."""
    settings = ObserveSettings()
    if kind == "manager":
        backend = request.getfixturevalue("manager_backend")
        writer: MemoryTraceStore | RedisTraceStore = MemoryTraceStore(settings)
        reader: MemoryTraceStore | RedisTraceStore = writer
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"t{uuid.uuid4().hex[:6]}:"
        backend = RedisBackend(server.url, prefix=prefix)
        writer = RedisTraceStore(server.url, prefix, 60, settings)
        reader = RedisTraceStore(server.url, prefix, 60, settings)  # another daemon's
    async with running(example_organism, backend=backend) as pump:
        pump.observe.attach(writer)
        submission = await pump.inject_payload(Greeting("Ada"), "greeter")
        await submission.collect(5)
    if isinstance(writer, RedisTraceStore):
        await writer.close()
    stored = await reader.trace(submission.thread_id)
    assert stored is not None
    trace = assemble(submission.thread_id, stored.records, stored.dropped, with_xml=True)
    assert chain_of(trace) == GREETING_PATH
    assert trace["ended"] is not None
    recent = await reader.recent(10)
    assert recent[0]["conversation"] == submission.thread_id
    assert recent[0]["hops"] == 6
    if isinstance(reader, RedisTraceStore):
        await reader.close()


def test_nothing_is_observed_when_nothing_is_attached() -> None:
    observation = Observation()
    assert observation.hop("c", "a", "b", "t", Ping, b"<Ping/>") == ""
    observation.handling("", "c", "b")
    observation.handled(None)
    assert observation.traceparent() is None
