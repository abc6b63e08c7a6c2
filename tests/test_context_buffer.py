"""ContextBuffer: append-only, immutable history with hard caps, on every backend."""

from __future__ import annotations

import dataclasses

import pytest

from tests.support import Ping
from xml_pipeline.memory.context_buffer import (
    BufferFull,
    ContextBuffer,
    TooManyThreads,
    get_context_buffer,
    reset_context_buffer,
)
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message.payload_codec import codec_for, payload_type_name


def record(buffer: ContextBuffer, thread: str, text: str) -> None:
    buffer.append(
        thread,
        from_id="a",
        to_id="b",
        payload_type=payload_type_name(Ping),
        payload_xml=codec_for(Ping).to_bytes(Ping(text)),
    )


def test_slots_keep_order_indices_and_payloads(backend: SharedBackend) -> None:
    buffer = ContextBuffer(backend)
    for text in ("one", "two", "three"):
        record(buffer, "t", text)
    slots = buffer.get_thread("t")
    assert [slot.index for slot in slots] == [0, 1, 2]
    assert [slot.payload for slot in slots] == [Ping("one"), Ping("two"), Ping("three")]
    assert buffer.get_slot("t", 1) == slots[1]
    assert buffer.get_slot("t", 3) is None
    assert (buffer.thread_len("t"), buffer.thread_exists("t"), buffer.list_threads()) == (3, True, ["t"])


def test_readers_cannot_change_history(backend: SharedBackend) -> None:
    buffer = ContextBuffer(backend)
    record(buffer, "t", "original")
    slot = buffer.get_thread("t")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        slot.payload_xml = b"<Ping><text>forged</text></Ping>"  # type: ignore[misc]
    assert buffer.get_thread("t")[0].payload == Ping("original")


def test_caps_refuse_instead_of_forgetting(backend: SharedBackend) -> None:
    buffer = ContextBuffer(backend, max_slots_per_thread=2, max_threads=2)
    record(buffer, "t1", "a")
    record(buffer, "t1", "b")
    with pytest.raises(BufferFull):
        record(buffer, "t1", "c")
    record(buffer, "t2", "a")
    with pytest.raises(TooManyThreads):
        record(buffer, "t3", "a")
    assert [slot.payload.text for slot in buffer.get_thread("t1")] == ["a", "b"]


def test_delete_and_clear(backend: SharedBackend) -> None:
    buffer = ContextBuffer(backend)
    record(buffer, "t1", "a")
    record(buffer, "t2", "a")
    assert buffer.delete_thread("t1") is True
    assert buffer.delete_thread("t1") is False
    assert buffer.list_threads() == ["t2"]
    buffer.clear()
    assert buffer.list_threads() == []


def test_invalid_caps_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ContextBuffer(max_slots_per_thread=0)


def test_module_level_buffer_is_a_resettable_singleton() -> None:
    reset_context_buffer()
    first = get_context_buffer()
    assert get_context_buffer() is first
    reset_context_buffer()
    assert get_context_buffer() is not first
