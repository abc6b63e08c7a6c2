"""The live tail: it sees bursts whole or says exactly what it dropped, and a stalled watcher costs the pump nothing."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import ROOT
from tests.daemon_support import running_daemon, wait_until, write_organism
from xml_pipeline.daemon.client import DaemonClient
from xml_pipeline.message.envelope import serialize_envelope
from xml_pipeline.message.safe_xml import parse_untrusted
from xml_pipeline.message_bus.thread_registry import new_thread_id
from xml_pipeline.observe.hub import EventHub, tail_event

HOPS_PER_GREETING = 6


def greet_many(client: DaemonClient, count: int) -> Counter[str]:
    """Send ``count`` greetings, a few at a time, waiting for each conversation's end; the answers by kind."""

    def one(_: int) -> str:
        payload = parse_untrusted(b"<Greeting><name>Ada</name></Greeting>")  # an element joins one envelope only
        answer = client.send(serialize_envelope("console", "greeter", new_thread_id(), payload), wait="end", timeout=30)
        body = answer.json()
        return "greeted" if body.get("ended") and "HELLO, ADA!" in body["replies"][0] else f"other: {body}"

    with ThreadPoolExecutor(4) as senders:
        return Counter(senders.map(one, range(count)))


def test_tail_sees_a_burst_of_a_thousand_messages_or_says_how_many_it_dropped() -> None:
    with running_daemon(ROOT / "organism.yaml") as daemon:
        tail = subprocess.Popen(
            [sys.executable, "-m", "xml_pipeline", "tail", "--json", "--socket", str(daemon.socket_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout or ()], daemon=True)
        reader.start()
        try:
            assert wait_until(lambda: daemon.client.status()["observe"]["watchers"] == 1, timeout=15)
            assert greet_many(daemon.client, 1000) == {"greeted": 1000}
            expected = 1000 * HOPS_PER_GREETING
            seen = dropped = 0
            while seen + dropped < expected:
                event = json.loads(lines.get(timeout=30))
                if event["kind"] == "hop":
                    seen += 1
                elif event["kind"] == "dropped":
                    dropped += event["dropped"]
            assert seen + dropped == expected
            assert lines.empty()
        finally:
            tail.terminate()
            tail.wait(10)
            reader.join(10)
            if tail.stdout is not None:
                tail.stdout.close()


def test_a_watcher_that_never_reads_holds_a_bounded_buffer_and_the_pump_goes_on(tmp_path: Path) -> None:
    organism = write_organism(tmp_path / "organism.yaml", pump="observe:\n  tail_buffer: 50\n")
    with running_daemon(organism) as daemon:
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(str(daemon.socket_path))
        try:
            stalled.sendall(b"GET /events HTTP/1.1\r\nHost: daemon\r\n\r\n")
            assert wait_until(lambda: daemon.client.status()["observe"]["watchers"] == 1, timeout=15)
            assert greet_many(daemon.client, 600) == {"greeted": 600}
            observed = daemon.client.status()
            assert observed["in_flight"] == 0
            assert observed["conversations"] == 0
            assert observed["observe"]["watchers"] == 1
            assert observed["observe"]["tail_buffered"] <= 50
            assert observed["observe"]["tail_dropped"] > 0
        finally:
            stalled.close()


def test_a_watcher_is_told_exactly_how_many_events_it_lost() -> None:
    hub = EventHub(buffer=10, max_watchers=2)
    watcher = hub.watch(None, errors_only=False)
    for index in range(25):
        hub.hop(("hop", f"{index:016x}", "", "c", "console", "greeter", "t", "Greeting", b"", 0.0))
    events, dropped = watcher.take()
    assert (len(events), dropped) == (10, 15)
    assert [tail_event(event)["hop"] for event in events] == [f"{index:016x}" for index in range(10)]
    hub.forget(watcher)
    hub.hop(("hop", "f" * 16, "", "c", "console", "greeter", "t", "Greeting", b"", 0.0))
    assert hub.stats() == {"watchers": 0, "tail_buffered": 0, "tail_dropped": 0}
