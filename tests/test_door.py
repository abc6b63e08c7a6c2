"""Connections cannot lock the door: a cap with eviction of idle ones, header and body deadlines."""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_support import (
    closed_by_peer,
    raise_own_open_files,
    running_daemon,
    short_directory,
    wait_until,
    write_organism,
)
from tests.support import envelope
from xml_pipeline.daemon.door import ConnectionGuard, DoorLimits, default_max_connections

GREETING = envelope('<Greeting xmlns=""><name>Ada</name></Greeting>', to="greeter")


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False
        self.closed = False
        self.written = b""

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        self.written += data


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guard_of(max_connections: int, clock: Clock) -> ConnectionGuard:
    return ConnectionGuard(DoorLimits(max_connections, header_timeout_seconds=10), clock=clock)


def test_at_the_cap_the_longest_idle_connection_makes_room() -> None:
    clock = Clock()
    guard = guard_of(3, clock)
    first, second, third, newcomer = (FakeTransport() for _ in range(4))
    for transport in (first, second, third):
        assert guard.admit(transport)  # type: ignore[arg-type]
        clock.now += 1
    guard.request_started(first)  # type: ignore[arg-type]  # busy: never evicted
    assert guard.admit(newcomer)  # type: ignore[arg-type]
    assert (first.aborted, second.aborted, third.aborted) == (False, True, False)
    assert (guard.open_connections, guard.evicted, guard.refused) == (3, 1, 0)


def test_when_every_connection_is_busy_the_newcomer_gets_503() -> None:
    clock = Clock()
    guard = guard_of(2, clock)
    busy = [FakeTransport(), FakeTransport()]
    for transport in busy:
        guard.admit(transport)  # type: ignore[arg-type]
        guard.request_started(transport)  # type: ignore[arg-type]
    newcomer = FakeTransport()
    assert not guard.admit(newcomer)  # type: ignore[arg-type]
    assert newcomer.written.startswith(b"HTTP/1.1 503 ")
    assert newcomer.closed
    assert not any(transport.aborted for transport in busy)
    assert guard.refused == 1


def test_a_connection_without_a_request_in_progress_times_out() -> None:
    clock = Clock()
    guard = guard_of(10, clock)
    dribbling, working, finished = FakeTransport(), FakeTransport(), FakeTransport()
    for transport in (dribbling, working, finished):
        guard.admit(transport)  # type: ignore[arg-type]
    guard.request_started(working)  # type: ignore[arg-type]
    guard.request_started(finished)  # type: ignore[arg-type]
    clock.now += 8
    guard.request_finished(finished)  # its idle time starts again now
    clock.now += 3
    assert guard.sweep() == 1
    assert (dribbling.aborted, working.aborted, finished.aborted) == (True, False, False)
    clock.now += 8
    assert guard.sweep() == 1
    assert finished.aborted
    assert not working.aborted


def test_reaching_the_cap_is_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    guard = guard_of(1, clock)
    caplog.set_level(logging.WARNING, logger="xml_pipeline.daemon")
    for _ in range(5):
        guard.admit(FakeTransport())  # type: ignore[arg-type]
    clock.now += 60
    guard.admit(FakeTransport())  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "connection limit reached" in r.getMessage()]
    assert len(lines) == 2
    assert "5 idle connection(s) closed" in lines[1]


def test_the_default_cap_leaves_descriptors_free() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        assert 8 <= default_max_connections() <= soft - 64


# ---------------------------------------------------------------- the real daemon


@contextlib.contextmanager
def half_open_requests(path: Path, count: int) -> Iterator[list[socket.socket]]:
    """Connections that send a request line and one header, then nothing: a slow-loris flood."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(path))
            client.sendall(b"POST /messages HTTP/1.1\r\nHost: localhost\r\n")
            sockets.append(client)
        yield sockets
    finally:
        for client in sockets:
            client.close()


def test_a_flood_of_half_open_connections_does_not_lock_out_normal_clients() -> None:
    """1,100 half-open connections against 256 descriptors: normal requests are still served."""
    raise_own_open_files(4096)
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump="http:\n  header_timeout_seconds: 2\n")
        with running_daemon(organism, open_files=256) as daemon:
            status = daemon.client.status()
            assert status["accepting"]
            with half_open_requests(daemon.socket_path, 1100) as flood:
                for _ in range(5):
                    answer = daemon.client.send(GREETING, wait="end", timeout=10)
                    assert answer.status == 200, answer.body
                    assert "HELLO, ADA!" in answer.json()["replies"][0]
                assert "connection limit reached" in daemon.log()
                assert wait_until(lambda: all(closed_by_peer(c) for c in flood), timeout=15), (
                    "half-open connections outlived the header timeout"
                )
            assert daemon.stop() == 0
            assert "Too many open files" not in daemon.log()


def test_a_body_that_never_arrives_gets_408_with_a_system_error() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump="http:\n  body_timeout_seconds: 0.5\n")
        with running_daemon(organism) as daemon:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(10)
            client.connect(str(daemon.socket_path))
            client.sendall(b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n<message")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = client.recv(65536)
                if not chunk:
                    break
                answer += chunk
            client.close()
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b'"code": "body-timeout"' in answer
            assert daemon.client.send(GREETING, wait="end", timeout=10).status == 200
            assert daemon.stop() == 0


def test_200_slow_clients_do_not_stop_a_normal_one_from_being_served() -> None:
    """200 clients dribbling their bodies hold requests in progress; a client that talks is still answered."""
    raise_own_open_files(4096)
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump="http:\n  body_timeout_seconds: 60\n")
        with running_daemon(organism) as daemon:
            slow: list[socket.socket] = []
            try:
                for _ in range(200):
                    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    client.connect(str(daemon.socket_path))
                    client.sendall(b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4096\r\n\r\n<mes")
                    slow.append(client)
                for client in slow:
                    client.sendall(b"s")
                for _ in range(3):
                    answer = daemon.client.send(GREETING, wait="end", timeout=10)
                    assert answer.status == 200, answer.body
                assert daemon.client.status()["accepting"]
                assert not any(closed_by_peer(client) for client in slow)  # still dribbling, still held
            finally:
                for client in slow:
                    client.close()
            assert daemon.stop() == 0


def test_a_connection_whose_body_is_still_arriving_makes_room_like_an_idle_one() -> None:
    clock = Clock()
    guard = guard_of(2, clock)
    dribbling, working, newcomer = FakeTransport(), FakeTransport(), FakeTransport()
    for transport in (dribbling, working):
        guard.admit(transport)  # type: ignore[arg-type]
        guard.request_started(transport)  # type: ignore[arg-type]
    guard.reading_body(dribbling, True)  # type: ignore[arg-type]
    assert guard.admit(newcomer)  # type: ignore[arg-type]
    assert (dribbling.aborted, working.aborted) == (True, False)


def test_clients_dribbling_their_bodies_do_not_lock_out_normal_clients() -> None:
    """Every connection holds a request whose body trickles in; whole requests are still served."""
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump="http:\n  max_connections: 20\n")
        with running_daemon(organism) as daemon:
            dribblers = []
            try:
                for _ in range(20):
                    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    client.connect(str(daemon.socket_path))
                    client.sendall(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n<message")
                    dribblers.append(client)
                assert wait_until(lambda: daemon.client.status()["connections"]["reading_body"] >= 19, timeout=10)
                served = [daemon.client.send(GREETING, wait="end", timeout=10).status for _ in range(20)]
            finally:
                for client in dribblers:
                    client.close()
            assert served == [200] * 20
            assert daemon.stop() == 0
