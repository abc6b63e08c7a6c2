"""Per-client rate limit: a token bucket per client, 429 with Retry-After, and recovery."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.daemon_support import running_daemon, short_directory, wait_until, write_organism
from tests.support import envelope
from xml_pipeline.daemon.client import DaemonClient, DoorRefused
from xml_pipeline.daemon.rate_limit import RateLimiter

GREETING = envelope('<Greeting xmlns=""><name>Ada</name></Greeting>', to="greeter")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0  # every client has a bucket of its own
    clock.now += 0.5
    assert limiter.take("a") == 0
    assert limiter.take("a") > 0


def test_full_buckets_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10, burst=1, clock=clock)
    limiter.take("a")
    limiter.sweep()
    assert len(limiter) == 1
    clock.now += 1
    limiter.sweep()
    assert len(limiter) == 0


def _refused_with(call: Callable[[], object]) -> DoorRefused | None:
    try:
        call()
    except DoorRefused as refused:
        return refused
    return None


def test_the_daemon_answers_429_with_retry_after_and_serves_again_later() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump="http:\n  rate_per_second: 1\n  rate_burst: 2\n")
        with running_daemon(organism) as daemon:
            client = daemon.client
            for _ in range(2):
                assert client.send(GREETING, wait="end", timeout=10).status == 200
            refused = _refused_with(client.status)
            assert refused is not None
            assert refused.status == 429
            assert "retry after 1s" in str(refused)
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(str(daemon.socket_path))
            raw.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = raw.recv(4096)
            raw.close()
            assert answer.startswith(b"HTTP/1.1 429 ")
            assert b"Retry-After: 1\r\n" in answer
            assert DaemonClient(socket_path=daemon.socket_path).request("GET", "/healthz").status == 200
            served = wait_until(
                lambda: _refused_with(lambda: client.send(GREETING, wait="end", timeout=10)) is None, timeout=10
            )
            assert served, "the bucket never refilled"
            assert daemon.stop() == 0
