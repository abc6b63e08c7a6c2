"""How calls and outcomes travel between the daemon and a worker: length-prefixed pickles on a socket.

Each message is a 4-byte big-endian length and a pickle. Both ends are
processes of this daemon (its own workers, spawned from the same code), so
pickle is as safe here as in the executor's own queues; the socket lives in a
directory only the daemon's user can enter, and each connection starts with a
greeting of fixed shape, read without unpickling anything, that carries a
secret the worker was handed at spawn time.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO, NamedTuple

_LENGTH = struct.Struct("!I")
HEADER_BYTES = _LENGTH.size

STOP = None
"""Sent to a worker instead of a call: run the calls before it, then end the session."""

_HELLO = struct.Struct("!16sQI")
TOKEN_BYTES = 16


class Hello(NamedTuple):
    """A worker's first message: the pool's secret, its generation, and who it is. Plain bytes, no pickle."""

    token: bytes
    generation: int
    pid: int

    def framed(self) -> bytes:
        return _LENGTH.pack(_HELLO.size) + _HELLO.pack(self.token, self.generation, self.pid)

    @classmethod
    def parse(cls, body: bytes) -> Hello | None:
        """The greeting in ``body``, or None if it is not one."""
        if len(body) != _HELLO.size:
            return None
        token, generation, pid = _HELLO.unpack(body)
        return cls(token, generation, pid)


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Cuts the bytes read from a non-blocking socket into whole messages, however they were split.

    With ``greeting``, the first message is the raw bytes of a Hello (empty if
    it announces any other length), and nothing is unpickled before it.
    """

    def __init__(self, *, greeting: bool = False) -> None:
        self._buffer = bytearray()
        self._greeting = greeting

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return every message now complete, in order."""
        buffer = self._buffer
        buffer += data
        messages: list[Any] = []
        start = 0
        with memoryview(buffer) as view:  # released before the buffer is cut below
            while len(view) - start >= HEADER_BYTES:
                (length,) = _LENGTH.unpack_from(view, start)
                if self._greeting and length != _HELLO.size:
                    self._greeting = False
                    return [b""]  # not a worker: its owner closes the channel
                end = start + HEADER_BYTES + length
                if end > len(view):
                    break
                if self._greeting:
                    self._greeting = False
                    messages.append(bytes(view[start + HEADER_BYTES : end]))
                else:
                    messages.append(pickle.loads(view[start + HEADER_BYTES : end]))
                start = end
        if start:
            del buffer[:start]
        return messages


class Closed(Exception):
    """The other end closed the socket."""


def read_message(stream: BinaryIO) -> Any:
    """The next message from a blocking, buffered stream (the worker's end); Closed at its end."""
    header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES:
        raise Closed
    (length,) = _LENGTH.unpack(header)
    body = stream.read(length)
    if len(body) < length:
        raise Closed
    return pickle.loads(body)
