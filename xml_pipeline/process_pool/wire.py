"""How calls and outcomes travel between the daemon and a worker: length-prefixed pickles on a socket.

Each message is a 4-byte big-endian length and a pickle. Both ends are
processes of this daemon (its own workers, spawned from the same code), so
pickle is as safe here as in the executor's own queues; the socket lives in a
directory only the daemon's user can enter, and each connection starts with a
secret the worker was handed at spawn time.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO

_LENGTH = struct.Struct("!I")
HEADER_BYTES = _LENGTH.size

STOP = None
"""Sent to a worker instead of a call: run the calls before it, then end the session."""


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Cuts the bytes read from a non-blocking socket into whole messages, however they were split."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return every message now complete, in order."""
        buffer = self._buffer
        buffer += data
        messages = []
        start = 0
        with memoryview(buffer) as view:  # released before the buffer is cut below
            while len(view) - start >= HEADER_BYTES:
                (length,) = _LENGTH.unpack_from(view, start)
                end = start + HEADER_BYTES + length
                if end > len(view):
                    break
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
