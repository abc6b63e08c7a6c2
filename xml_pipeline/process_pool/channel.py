"""The daemon's end of one worker's socket: calls go out in batches, each outcome comes back on its own.

A ProcessPoolExecutor moves every call through its manager thread, a feeder
thread and two pipes, and every result back through the same thread and a
wake-up of the event loop. Here the event loop writes calls straight into the
worker's socket (all the calls handed over in one turn of the loop in one
write) and reads outcomes when the socket is readable, resolving each call's
future as its outcome arrives. The executor still owns the process.

The worker runs its calls one at a time in the order they were sent, so the
channel knows which calls the worker holds. When the socket closes, or the
generation it belongs to breaks, it fails each of them with ChannelClosed;
which of them crashed is judged elsewhere (see ``generation``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from concurrent.futures import BrokenExecutor
from typing import Protocol

from xml_pipeline.process_pool.wire import STOP, FrameReader, Hello, frame
from xml_pipeline.process_pool.worker import Outcome, Task

log = logging.getLogger("xml_pipeline.pool")

READ_BYTES = 1 << 16


class ChannelClosed(BrokenExecutor):
    """The worker's socket closed, or its executor broke, with the call in it."""


class ChannelOwner(Protocol):
    def greeted(self, channel: WorkerChannel, hello: Hello | None) -> None:
        """The first message arrived: who the worker is, or None if it was no greeting."""

    def answered(self, channel: WorkerChannel) -> None:
        """Some outcomes arrived: the channel has room for more calls."""

    def closed(self, channel: WorkerChannel, held_calls: bool) -> None:
        """The socket closed; ``held_calls`` if the worker still held calls then."""


class WorkerChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, owner: ChannelOwner) -> None:
        self.owner = owner
        self.pid = 0
        """The worker's pid, once it has said hello."""
        self.sent = 0
        """Calls sent over this channel in all: what max_tasks_per_child counts."""
        self.stopping = False
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._reader = FrameReader(greeting=True)
        self._in_flight: dict[int, asyncio.Future[Outcome]] = {}
        """Calls the worker holds, by hand-over number."""
        self._out: list[bytes] = []
        self._unsent = b""
        self._flush_scheduled = False
        self._abandoned = False
        loop.add_reader(self._fd, self._on_readable)

    @property
    def load(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._in_flight)

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def send(self, slot: int, number: int, task: Task, future: asyncio.Future[Outcome]) -> None:
        """Queue the call for this turn's write; ``future`` resolves with the worker's outcome."""
        if self._abandoned:
            future.set_exception(ChannelClosed(f"the channel to worker {self.pid} is closed"))
            return
        self._in_flight[number] = future
        self.sent += 1
        self._queue(frame((slot, number, task.packed())))

    def stop(self) -> None:
        """Let the worker end its session once it has run what it holds (its process may then exit)."""
        if not self.stopping and not self._abandoned:
            self.stopping = True
            self._queue(frame(STOP))

    def _queue(self, message: bytes) -> None:
        self._out.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._abandoned or self._unsent or not self._out:
            return  # a pending write takes what was queued when the socket drains
        data = b"".join(self._out)
        self._out.clear()
        self._write(data)

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._fd)
        data = self._unsent + b"".join(self._out)
        self._unsent = b""
        self._out.clear()
        self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            written = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError:
            self.close()
            return
        if written < len(data):
            self._unsent = data[written:]
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            self._received(data)
        except Exception:  # a bug on either end: fail the calls rather than leave them waiting for nothing
            log.exception("worker pool: unreadable message from worker %d; dropping its channel", self.pid)
            self.close()

    def _received(self, data: bytes) -> None:
        messages = self._reader.feed(data)
        if self.pid == 0 and messages:
            self.owner.greeted(self, Hello.parse(messages.pop(0)))
        for number, outcome in messages:
            future = self._in_flight.pop(number, None)
            if future is not None and not future.done():  # its caller may have given up on it
                future.set_result(Outcome.unpacked(outcome))
        if messages and not self._abandoned:
            self.owner.answered(self)

    def abandon(self) -> None:
        """Stop reading and writing; fail every call the worker still held. The socket stays open.

        A worker whose generation broke is about to be stopped by its executor;
        were its socket closed first, it could end its session on its own and
        exit in a way that reads as a crash of the call it had just run.
        """
        if self._abandoned:
            return
        self._abandoned = True
        self._loop.remove_reader(self._fd)
        if self._unsent:
            self._loop.remove_writer(self._fd)
        held, self._in_flight = self._in_flight, {}
        for future in held.values():
            if not future.done():
                future.set_exception(ChannelClosed(f"worker {self.pid} was lost during the call"))
        self._out.clear()
        self._unsent = b""

    def close(self) -> None:
        """Abandon the channel and close the socket; tell the owner (once) if it was still in use."""
        was_open = not self._abandoned
        held_calls = bool(self._in_flight)
        self.abandon()
        if self._sock.fileno() != -1:
            self._sock.close()
        if was_open:
            self.owner.closed(self, held_calls)
