"""The door's own bounds: how many connections, and how long one may take to say what it wants.

aiohttp bounds the size of request lines and headers, not the time they take.
A client that opens a connection and sends a request line and a header now and
then holds a file descriptor for as long as it likes, and a thousand of them
exhaust the process's descriptors (slow loris): then nobody is served, and
nothing says why. The guard wraps the protocol of every connection:

- At most ``max_connections`` are open. When one more arrives, the open
  connection that has gone longest without a request in progress is closed to
  make room, so clients that idle or dribble can never lock out one that
  talks. Only when every open connection is busy with a request is the
  newcomer answered ``503`` and closed. Either way a warning is logged (at
  most once per ``WARN_EVERY_SECONDS``, with counts).
- A connection with no request in progress (before its first request,
  between keep-alive requests, or while its headers trickle in) is closed
  after ``header_timeout_seconds``.
- Bodies are read under ``body_timeout_seconds`` by the HTTP handler.

The guard only counts and closes; it never reads or delays bytes, so a
connection that talks costs two dictionary operations.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

log = logging.getLogger("xml_pipeline.daemon")

WARN_EVERY_SECONDS = 10.0
DESCRIPTOR_RESERVE = 64
"""Descriptors kept free of connections: sockets, pipes to pool workers, the store, logs."""

_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: 62\r\n\r\n"
    b'{"error": "too many open connections; every one of them busy"}'
)


def default_max_connections() -> int:
    """Three quarters of the open-file limit (at least 64 short of it), so connections never take them all."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 16384
    return max(8, soft - max(DESCRIPTOR_RESERVE, soft // 4))


@dataclass(frozen=True, slots=True)
class DoorLimits:
    max_connections: int
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.header_timeout_seconds <= 0 or self.body_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")


class _Connection:
    __slots__ = ("busy", "idle_since", "transport")

    def __init__(self, transport: asyncio.Transport, now: float) -> None:
        self.transport = transport
        self.idle_since = now
        self.busy = 0
        """Requests in progress on it (more than one only with HTTP pipelining)."""


class ConnectionGuard:
    def __init__(self, limits: DoorLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self._last_warning = float("-inf")

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def wrap(self, factory: Callable[[], asyncio.BaseProtocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that puts every connection under this guard."""
        return lambda: _GuardedProtocol(factory(), self)

    # ------------------------------------------------------------------ connection events
    def admit(self, transport: asyncio.Transport) -> bool:
        """Make room for a new connection if need be; False when it must be turned away."""
        if len(self._open) >= self.limits.max_connections:
            victim = self._longest_idle()
            if victim is None:
                self.refused += 1
                self._warn_full()
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return False
            self.evicted += 1
            self._warn_full()
            self._drop(victim)
        self._open[transport] = _Connection(transport, self._clock())
        return True

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self._open.pop(transport, None)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.busy += 1

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.busy -= 1
            connection.idle_since = self._clock()

    # ------------------------------------------------------------------ housekeeping
    def sweep(self) -> int:
        """Close connections that went ``header_timeout_seconds`` without a request in progress."""
        deadline = self._clock() - self.limits.header_timeout_seconds
        stale = [c for c in self._open.values() if not c.busy and c.idle_since <= deadline]
        for connection in stale:
            self._drop(connection)
        self.timed_out += len(stale)
        return len(stale)

    def close_all(self) -> None:
        for connection in list(self._open.values()):
            self._drop(connection)

    def _longest_idle(self) -> _Connection | None:
        idle = (c for c in self._open.values() if not c.busy)
        return min(idle, key=lambda c: c.idle_since, default=None)

    def _drop(self, connection: _Connection) -> None:
        self._open.pop(connection.transport, None)
        connection.transport.abort()  # frees the descriptor now, not after a lingering close

    def _warn_full(self) -> None:
        now = self._clock()
        if now - self._last_warning < WARN_EVERY_SECONDS:
            return
        log.warning(
            "connection limit reached: %d open (max_connections=%d); %d idle connection(s) closed to make room "
            "and %d refused so far",
            len(self._open),
            self.limits.max_connections,
            self.evicted,
            self.refused,
        )
        self._last_warning = now


class _GuardedProtocol(asyncio.Protocol):
    """Passes every event to the real protocol, after the guard has had its say."""

    def __init__(self, inner: asyncio.BaseProtocol, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._admitted = False
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._admitted = self._guard.admit(cast(asyncio.Transport, transport))  # uvloop's are not subclasses
        if self._admitted:
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        if self._admitted:
            return self._inner.eof_received()  # type: ignore[attr-defined, no-any-return]
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            assert self._transport is not None
            self._guard.forget(self._transport)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()
