"""A store that stops answering or dies: the daemon never freezes, says so, and recovers or restarts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_support import DaemonProcess, running_daemon, short_directory, write_organism
from tests.redis_server import RedisServer
from tests.support import envelope
from xml_pipeline.daemon.client import DaemonClient, Response
from xml_pipeline.memory.circuit import Circuit
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import BackendUnavailable
from xml_pipeline.message.envelope import read_envelope
from xml_pipeline.message.safe_xml import parse_untrusted

GREETING = envelope('<Greeting xmlns=""><name>Ada</name></Greeting>', to="greeter")
PROMPT = 1.0
"""How long a request that needs no store may take while the store is stalled: the issue's bound."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_open_circuit_fails_fast_until_reset() -> None:
    circuit = Circuit(retry_after=None, clock=Clock())
    circuit.check()
    circuit.trip("redis is unreachable: timeout")
    with pytest.raises(BackendUnavailable, match="failing fast"):
        circuit.check()
    circuit.reset()
    circuit.check()


def test_an_open_circuit_lets_one_call_through_per_interval_when_nobody_probes() -> None:
    clock = Clock()
    circuit = Circuit(retry_after=1.0, clock=clock)
    circuit.trip("down")
    with pytest.raises(BackendUnavailable):
        circuit.check()
    clock.now = 1.0
    circuit.check()  # the trial call
    with pytest.raises(BackendUnavailable):
        circuit.check()  # the others still fail fast
    clock.now = 2.0
    circuit.check()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.close()


def test_a_stalled_redis_fails_calls_fast_and_a_ping_closes_the_circuit(own_redis: RedisServer) -> None:
    backend = RedisBackend(own_redis.url, prefix="stall:", socket_timeout=0.3, fail_fast_seconds=None)
    assert own_redis.process is not None
    try:
        backend.registry_set("a.b", "u1")
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="unreachable"):
            backend.registry_get_uuid("a.b")  # waits out one socket timeout, then opens the circuit
        assert time.monotonic() - started < 1.0, "a timed-out call was retried (4 tries would take over 1.2 s)"
        started = time.monotonic()
        for _ in range(50):
            with pytest.raises(BackendUnavailable, match="failing fast"):
                backend.registry_get_uuid("a.b")
        assert time.monotonic() - started < 0.3 * 50  # none of them waited for the socket timeout
        assert not backend.ping()
        os.kill(own_redis.process.pid, signal.SIGCONT)
        assert backend.ping()
        assert backend.registry_get_uuid("a.b") == "u1"
    finally:
        backend.close()


def _redis_organism(directory: Path, url: str) -> Path:
    backend = f"backend:\n  type: redis\n  redis_url: {url}\n  redis_prefix: 'stall:'\n  redis_timeout_seconds: 0.5\n"
    return write_organism(directory / "organism.yaml", pump=backend)


def _prompt(daemon: DaemonProcess, path: str) -> tuple[int, dict[str, object]]:
    """GET ``path``, which must answer within PROMPT seconds (DaemonUnreachable otherwise)."""
    answer = daemon.client.request("GET", path, timeout=PROMPT)
    return answer.status, answer.json()


def _error_code(answer: Response) -> str | None:
    """The SystemError code of a POST's answer: a refusal at the door, or the conversation's error reply."""
    body = answer.json()
    if not body.get("accepted"):
        return str(body["error"]["code"])
    reply = read_envelope(parse_untrusted(body["replies"][0].encode())).payload
    return reply.findtext("code")


def _wait_for(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.05)


def test_sigstopped_redis_never_freezes_the_daemon_and_it_recovers(own_redis: RedisServer) -> None:
    assert own_redis.process is not None
    with short_directory() as directory, running_daemon(_redis_organism(directory, own_redis.url)) as daemon:
        assert daemon.client.send(GREETING, wait="end", timeout=10).status == 200
        assert _prompt(daemon, "/healthz")[0] == 200
        os.kill(own_redis.process.pid, signal.SIGSTOP)

        assert _error_code(daemon.client.send(GREETING, wait="end", timeout=5)) == "backend-unavailable"
        _wait_for(lambda: _prompt(daemon, "/healthz")[0] == 503, timeout=10)
        _, health = _prompt(daemon, "/healthz")
        assert health["status"] == "degraded"
        assert _prompt(daemon, "/status")[1]["backend_health"]["state"] == "unavailable"  # type: ignore[index]
        quick = DaemonClient(socket_path=daemon.socket_path)
        for _ in range(20):  # every message is refused at once, none waits for the stalled store
            answer = quick.request("POST", "/messages?wait=end", body=GREETING, timeout=PROMPT)
            assert _error_code(answer) == "backend-unavailable"

        os.kill(own_redis.process.pid, signal.SIGCONT)
        _wait_for(lambda: _prompt(daemon, "/healthz")[0] == 200, timeout=10)
        answer = daemon.client.send(GREETING, wait="end", timeout=10)
        assert answer.status == 200
        assert "HELLO, ADA!" in answer.json()["replies"][0]
        assert daemon.stop() == 0
        log = daemon.log()
    assert "shared state unavailable" in log
    assert "shared state is back" in log


def test_a_killed_state_manager_makes_the_daemon_exit_non_zero_and_say_why() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump="backend:\n  type: manager\n")
        with running_daemon(organism) as daemon:
            assert daemon.client.send(GREETING, wait="end", timeout=10).status == 200
            manager_pid = daemon.client.status()["state_manager_pid"]
            assert isinstance(manager_pid, int)
            os.kill(manager_pid, signal.SIGKILL)
            assert daemon.process.wait(30) == 1
            log = daemon.log()
    assert f"the state manager (pid {manager_pid}) exited" in log
    assert "exiting so that the service manager restarts the daemon" in log
