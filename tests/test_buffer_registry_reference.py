"""The reference design's BufferRegistry calls, exactly as its users write them, on memory, manager and Redis."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.primitive_support import Count, add_one
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message_bus.buffer_registry import (
    BufferItemResult,
    BufferRegistry,
    BufferState,
    get_buffer_registry,
    reset_buffer_registry,
)
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.primitives import BufferComplete, BufferStart
from xml_pipeline.testing import ask, running


def test_create_positional_or_keyword(backend: SharedBackend) -> None:
    registry = BufferRegistry(backend)
    state = registry.create(buffer_id="b1", total_items=3, return_to="me", thread_id="t", from_id="me", target="w")
    assert state == BufferState("b1", 3, "me", "t", "me", "w", True, {}, 0, 0)
    assert registry.create("b2", 2, "me", "t", "me", "w", False).collect is False
    assert registry.get("b1") == state
    assert sorted(registry.list_active()) == ["b1", "b2"]
    registry.clear()
    assert registry.list_active() == []


def test_record_result_returns_the_buffer_as_it_now_is(backend: SharedBackend) -> None:
    registry = BufferRegistry(backend)
    registry.create("b1", 3, "me", "t", "me", "w")
    state = registry.record_result("b1", 2, "<two/>")
    assert state is not None
    assert (state.completed_count, state.successful_count, state.pending_count, state.is_complete) == (1, 1, 2, False)
    assert state.get_ordered_results() == [None, None, BufferItemResult(2, "<two/>")]
    state = registry.record_result(buffer_id="b1", index=0, result="", success=False, error="it broke")
    assert state is not None
    assert state.results[0] == BufferItemResult(0, "", success=False, error="it broke")
    state = registry.record_result("b1", 1, "<one/>", True, None)
    assert state is not None
    assert (state.completed_count, state.successful_count, state.pending_count, state.is_complete) == (3, 2, 0, True)
    assert [item.index for item in state.get_ordered_results() if item is not None] == [0, 1, 2]


def test_a_second_result_for_an_index_changes_nothing(backend: SharedBackend) -> None:
    registry = BufferRegistry(backend)
    registry.create("b1", 2, "me", "t", "me", "w")
    first = registry.record_result("b1", 0, "<first/>")
    second = registry.record_result("b1", 0, "", success=False, error="late")
    assert first == second
    assert second is not None
    assert (second.completed_count, second.successful_count, second.results[0].result) == (1, 1, "<first/>")


def test_unknown_buffers_and_indices(backend: SharedBackend) -> None:
    registry = BufferRegistry(backend)
    assert registry.get("nope") is None
    assert registry.record_result("nope", 0, "<x/>") is None
    assert registry.list_active() == []  # recording for an unknown buffer leaves nothing behind
    registry.create("b1", 2, "me", "t", "me", "w")
    with pytest.raises(IndexError):
        registry.record_result("b1", 2, "<x/>")
    assert registry.remove("b1") is True
    assert registry.remove("b1") is False
    assert registry.get("b1") is None


def test_many_os_threads_recording_at_once_count_each_item_once(backend: SharedBackend) -> None:
    registry = BufferRegistry(backend)
    total, writers = 60, 8
    registry.create("b1", total, "me", "t", "me", "w")

    def record_all(writer: int) -> None:
        for index in range(total):
            registry.record_result("b1", index, f"<w{writer}/>", success=index % 3 != 0)

    with ThreadPoolExecutor(writers) as executor:
        list(executor.map(record_all, range(writers)))
    state = registry.get("b1")
    assert state is not None
    assert (state.completed_count, state.successful_count, state.is_complete) == (total, total - total // 3, True)
    assert all(item is not None and item.index == index for index, item in enumerate(state.get_ordered_results()))
    registry.remove("b1")


def test_states_are_constructible_directly() -> None:
    item = BufferItemResult(index=0, result="<x/>")
    assert (item.success, item.error) == (True, None)
    state = BufferState(
        buffer_id="b", total_items=2, return_to="r", thread_id="t", from_id="f", target="w", results={0: item}
    )
    assert (state.collect, state.completed_count, state.successful_count, state.pending_count) == (True, 0, 0, 2)
    assert state.get_ordered_results() == [item, None]


def test_the_process_wide_buffer_registry() -> None:
    reset_buffer_registry()
    registry = get_buffer_registry()
    assert get_buffer_registry() is registry
    reset_buffer_registry()
    assert get_buffer_registry() is not registry
    reset_buffer_registry()


def test_buffer_start_takes_items_as_one_string_of_lines() -> None:
    start = BufferStart(target="w", items="<Count><value>1</value></Count>\n\n  <Count><value>2</value></Count>  \n")  # type: ignore[arg-type]
    assert start.items == ["<Count><value>1</value></Count>", "<Count><value>2</value></Count>"]
    wire = codec_for(BufferStart).to_bytes(start)
    assert codec_for(BufferStart).from_bytes(wire) == BufferStart("w", start.items)
    assert wire.count(b"<item>") == 2


async def test_a_buffer_started_with_a_string_of_items_completes(backend: SharedBackend) -> None:
    organism = Organism.of("buffers", [Listener("add1", [Count], add_one, peers=[])])
    items = "\n".join(f"<Count><value>{i}</value></Count>" for i in range(5))
    async with running(organism, backend=backend) as pump:
        reply = await ask(pump, BufferStart(target="add1", items=items), to="system.buffer")  # type: ignore[arg-type]
    assert isinstance(reply.payload, BufferComplete)
    assert (reply.payload.total, reply.payload.successful) == (5, 5)


def test_each_result_keeps_its_text_and_error_exactly(backend: SharedBackend) -> None:
    registry = BufferRegistry(backend)
    outcomes = [
        ("<a>1:2</a>", True, None),
        ("", False, "refused: 3:4 ü"),
        ("<b/>", True, ""),
        ("9:é", False, "5"),
    ]
    registry.create("exact", len(outcomes), "", "t", "me", "w")
    for index, (result, success, error) in enumerate(outcomes):
        assert registry.store_result("exact", index, result, success, error)
    state = registry.get("exact")
    assert state is not None
    assert [(item.result, item.success, item.error) for _, item in sorted(state.results.items())] == outcomes
    registry.remove("exact")
