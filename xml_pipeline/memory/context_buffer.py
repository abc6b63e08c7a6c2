"""Per-conversation history: every hop, once, in order, immutable.

History is keyed by the conversation's root thread UUID (the thread the client
sees), so every listener in a conversation reads the same story however deep
in the call chain it sits. Slots are frozen and carry the payload as XML bytes:
readers get copies they cannot use to rewrite history, and the encoding is the
same whichever backend stores it.

Caps are hard limits rather than eviction: a thread that reaches
``max_slots_per_thread`` or a buffer that reaches ``max_threads`` refuses the
append (:class:`BufferFull` / :class:`TooManyThreads`), and the pump turns that
into a ``SystemError``. A runaway conversation is stopped instead of silently
forgetting its beginning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from xml_pipeline.imports import import_object
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import BufferFull, SharedBackend, TooManyThreads
from xml_pipeline.memory.state_ops import AppendSlot
from xml_pipeline.process_wide import ProcessWide

__all__ = ["BufferFull", "BufferSlot", "ContextBuffer", "TooManyThreads", "get_context_buffer"]

_SEP = b"\x1f"  # not an XML 1.0 character, so it can never occur inside payload XML


@dataclass(frozen=True, slots=True)
class BufferSlot:
    thread_id: str
    index: int
    from_id: str
    to_id: str
    hop_thread: str
    payload_type: str
    timestamp: float
    payload_xml: bytes

    @property
    def payload(self) -> Any:
        """The payload decoded into a fresh instance of its class."""
        from xml_pipeline.message.payload_codec import codec_for

        return codec_for(import_object(self.payload_type)).from_bytes(self.payload_xml)


def _encode(from_id: str, to_id: str, hop_thread: str, payload_type: str, timestamp: float, xml: bytes) -> bytes:
    return f"{from_id}\x1f{to_id}\x1f{hop_thread}\x1f{payload_type}\x1f{timestamp!r}\x1f".encode() + xml


def _decode(thread_id: str, index: int, data: bytes) -> BufferSlot:
    from_id, to_id, hop_thread, payload_type, timestamp, xml = data.split(_SEP, 5)
    return BufferSlot(
        thread_id=thread_id,
        index=index,
        from_id=from_id.decode(),
        to_id=to_id.decode(),
        hop_thread=hop_thread.decode(),
        payload_type=payload_type.decode(),
        timestamp=float(timestamp),
        payload_xml=xml,
    )


class ContextBuffer:
    def __init__(
        self,
        backend: SharedBackend | None = None,
        *,
        max_slots_per_thread: int = 10_000,
        max_threads: int = 100_000,
    ) -> None:
        if max_slots_per_thread < 1 or max_threads < 1:
            raise ValueError("buffer caps must be positive")
        self.backend: SharedBackend = backend if backend is not None else InMemoryBackend()
        self.max_slots_per_thread = max_slots_per_thread
        self.max_threads = max_threads

    def append(
        self,
        thread_id: str,
        *,
        from_id: str,
        to_id: str,
        payload_type: str,
        payload_xml: bytes,
        hop_thread: str | None = None,
    ) -> BufferSlot:
        """Record one hop; raises BufferFull or TooManyThreads at the caps."""
        timestamp = time.time()
        hop = hop_thread or thread_id
        data = _encode(from_id, to_id, hop, payload_type, timestamp, payload_xml)
        index = self.backend.buffer_append(
            thread_id, data, max_slots=self.max_slots_per_thread, max_threads=self.max_threads
        )
        return BufferSlot(thread_id, index, from_id, to_id, hop, payload_type, timestamp, payload_xml)

    def append_op(
        self, thread_id: str, *, from_id: str, to_id: str, payload_type: str, payload_xml: bytes, hop_thread: str
    ) -> AppendSlot:
        """The write :meth:`append` makes, as a value, to run in a batch with others."""
        data = _encode(from_id, to_id, hop_thread, payload_type, time.time(), payload_xml)
        return AppendSlot(thread_id, data, self.max_slots_per_thread, self.max_threads)

    def get_thread(self, thread_id: str) -> tuple[BufferSlot, ...]:
        return tuple(
            _decode(thread_id, index, data) for index, data in enumerate(self.backend.buffer_get_thread(thread_id))
        )

    def get_slot(self, thread_id: str, index: int) -> BufferSlot | None:
        data = self.backend.buffer_get_slot(thread_id, index)
        return None if data is None else _decode(thread_id, index, data)

    def thread_len(self, thread_id: str) -> int:
        return self.backend.buffer_thread_len(thread_id)

    def thread_exists(self, thread_id: str) -> bool:
        return self.backend.buffer_thread_exists(thread_id)

    def delete_thread(self, thread_id: str) -> bool:
        return self.backend.buffer_delete_thread(thread_id)

    def list_threads(self) -> list[str]:
        return self.backend.buffer_list_threads()

    def clear(self) -> None:
        self.backend.buffer_clear()


_current: ProcessWide[ContextBuffer] = ProcessWide(ContextBuffer)
get_context_buffer = _current.get
"""The process-wide buffer (the running pump installs its own as this one)."""
set_context_buffer = _current.set
reset_context_buffer = _current.reset
