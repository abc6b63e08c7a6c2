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
  after ``header_timeout_seconds``. One whose request's body is still arriving
  is bounded by ``body_timeout_seconds`` instead, and counts as idle when room
  must be made: a client that dribbles its body cannot lock the door either.
- Bodies are read under ``body_timeout_seconds`` by the HTTP handler.

TLS connections are guarded from their first byte, not from the end of their
handshake: the guard admits the TCP connection, then runs the handshake over
it (``loop.start_tls``) under ``header_timeout_seconds``. A client that opens
a connection and never finishes its handshake counts against the cap, is the
first to make room, and is closed at the deadline like any other idler.

The guard only counts and closes; it never reads or delays bytes, so a
connection that talks costs two dictionary operations.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
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
    __slots__ = ("busy", "idle_since", "reading_body", "transport")

    def __init__(self, transport: asyncio.Transport, now: float) -> None:
        self.transport = transport
        self.idle_since = now
        self.busy = 0
        """Requests in progress on it (more than one only with HTTP pipelining)."""
        self.reading_body = False
        """Its request's body is still arriving: bounded by the body timeout, and evictable meanwhile."""

    @property
    def evictable(self) -> bool:
        return not self.busy or self.reading_body


class ConnectionGuard:
    def __init__(self, limits: DoorLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self._tls_over: dict[asyncio.BaseTransport, asyncio.BaseTransport] = {}
        """A TLS session's transport -> the TCP transport it runs over (which is what ``_open`` keys)."""
        self._handshakes: set[asyncio.Task[None]] = set()
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self._last_warning = float("-inf")

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def counts(self) -> dict[str, int]:
        """What ``status`` shows of the door."""
        connections = self._open.values()
        return {
            "open": len(self._open),
            "busy": sum(1 for c in connections if c.busy and not c.reading_body),
            "reading_body": sum(1 for c in connections if c.reading_body),
            "max_connections": self.limits.max_connections,
            "evicted": self.evicted,
            "refused": self.refused,
            "timed_out": self.timed_out,
        }

    def wrap(
        self, factory: Callable[[], asyncio.BaseProtocol], *, tls: ssl.SSLContext | None = None
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that puts every connection under this guard.

        With ``tls``, each connection speaks TLS: pass the context here, not to ``create_server``,
        so that the guard sees the connection while its handshake is still under way.
        """
        return lambda: _GuardedProtocol(factory(), self, tls)

    # ------------------------------------------------------------------ connection events
    def admit(self, transport: asyncio.Transport, *, plain_http: bool = True) -> bool:
        """Make room for a new connection if need be; False when it must be turned away."""
        if len(self._open) >= self.limits.max_connections:
            victim = self._longest_idle()
            if victim is None:
                self.refused += 1
                self._warn_full()
                if plain_http:  # a TLS client could not read a plain answer: it only sees the close
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

    def start_tls(self, transport: asyncio.Transport, protocol: _GuardedProtocol, context: ssl.SSLContext) -> None:
        """Run the server side of a TLS handshake over an admitted connection; ``protocol`` gets the session.

        The handshake task is the guard's: bounded by the header timeout, cancelled by :meth:`close_all`.
        """
        transport.pause_reading()  # asyncio's transports honour it here; uvloop's start reading after this call
        task = asyncio.get_running_loop().create_task(self._handshake(transport, protocol, context))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(
        self, transport: asyncio.Transport, protocol: _GuardedProtocol, context: ssl.SSLContext
    ) -> None:
        loop = asyncio.get_running_loop()
        early = protocol.hand_over_to_tls()
        if early:
            # start_tls installs its TLS layer before it yields, and schedules the layer's start and the
            # resumption of reading; this callback, scheduled first, runs between the two (call_soon is
            # first in, first out), so the bytes that came too early reach the layer first, in order.
            loop.call_soon(_replay, transport, protocol, early)
        try:
            session = await loop.start_tls(
                transport,
                protocol,
                context,
                server_side=True,
                ssl_handshake_timeout=self.limits.header_timeout_seconds,
            )
        except Exception as exc:  # a scanner, a client that hung up, a certificate refused: close, never crash
            log.debug("TLS handshake failed: %s: %s", type(exc).__name__, exc)
            self.forget(transport)
            transport.abort()
            return
        if session is None or transport not in self._open:  # made room for another, or timed out, just now
            self.forget(transport)
            transport.abort()
            return
        self._tls_over[session] = transport
        protocol.tls_session_ready(session)

    def tls_session_lost(self, session: asyncio.BaseTransport) -> None:
        self._tls_over.pop(session, None)

    def _connection_of(self, transport: asyncio.BaseTransport | None) -> _Connection | None:
        if transport is None:
            return None
        return self._open.get(self._tls_over.get(transport, transport))

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._connection_of(transport)
        if connection is not None:
            connection.busy += 1

    def reading_body(self, transport: asyncio.BaseTransport | None, reading: bool) -> None:
        """A request's body starts or stops arriving: until it is in, the connection may make room for others.

        A client that dribbles its body must not hold a connection that a
        client with a whole request could use: at the cap it is closed like an
        idle one (longest waiting first). The body timeout bounds it otherwise.
        """
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.reading_body = reading

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._connection_of(transport)
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

    async def close_all(self, timeout: float = 5.0) -> None:
        """Close every connection and end every handshake in progress."""
        for task in self._handshakes:
            task.cancel()
        for connection in list(self._open.values()):
            self._drop(connection)
        if self._handshakes:
            await asyncio.wait(self._handshakes, timeout=timeout)

    def _longest_idle(self) -> _Connection | None:
        idle = (c for c in self._open.values() if c.evictable)
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


def _replay(transport: asyncio.BaseTransport, protocol: _GuardedProtocol, data: bytes) -> None:
    """Give the TLS layer the bytes that reached ``protocol`` before the layer was installed."""
    layer = transport.get_protocol()
    if layer is protocol or transport.is_closing():
        return  # start_tls failed before it installed the layer; its error closes the connection
    buffered = cast(asyncio.BufferedProtocol, layer)  # both asyncio's and uvloop's TLS layers are buffered
    view = memoryview(data)
    while view:
        buffer = memoryview(buffered.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        buffered.buffer_updated(size)
        view = view[size:]


class _GuardedProtocol(asyncio.Protocol):
    """Passes every event to the real protocol, after the guard has had its say.

    With TLS, the TCP connection is admitted and its handshake started; the real protocol
    meets the TLS session when the handshake is done (:meth:`tls_session_ready`). Two kinds of
    bytes can come early and wait here, in order: the client's hello, when it arrives before
    the handshake task installs the TLS layer (reading pauses until it does, and the layer gets
    them first), and a request the layer decrypts before the session is handed over.
    """

    def __init__(self, inner: asyncio.BaseProtocol, guard: ConnectionGuard, tls: ssl.SSLContext | None) -> None:
        self._inner = inner
        self._guard = guard
        self._tls = tls
        self._admitted = False
        self._transport: asyncio.BaseTransport | None = None
        self._session: asyncio.BaseTransport | None = None
        self._early: list[bytes] = []
        self._before_tls: list[bytes] | None = [] if tls is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        tcp = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._admitted = self._guard.admit(tcp, plain_http=self._tls is None)
        if not self._admitted:
            return
        if self._tls is None:
            self._inner.connection_made(transport)
        else:
            self._guard.start_tls(tcp, self, self._tls)

    def tls_session_ready(self, session: asyncio.BaseTransport) -> None:
        self._session = session
        self._inner.connection_made(session)
        early, self._early = self._early, []
        for data in early:
            self._inner.data_received(data)  # type: ignore[attr-defined]

    def hand_over_to_tls(self) -> bytes:
        """From now on the TLS layer reads; what came before it is returned for it."""
        early, self._before_tls = b"".join(self._before_tls or ()), None
        return early

    def data_received(self, data: bytes) -> None:
        if self._before_tls is not None:
            self._before_tls.append(data)
            if self._transport is not None:
                self._transport.pause_reading()  # type: ignore[attr-defined]
        elif self._tls is not None and self._session is None:
            self._early.append(data)
        elif self._admitted:
            self._inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        if self._admitted:
            return self._inner.eof_received()  # type: ignore[attr-defined, no-any-return]
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            assert self._transport is not None
            self._guard.forget(self._transport)
            if self._session is not None:
                self._guard.tls_session_lost(self._session)
            if self._tls is None or self._session is not None:
                self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()
