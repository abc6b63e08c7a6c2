"""The reference design's SequenceRegistry calls, exactly as its users write them, on memory, manager and Redis."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message_bus.sequence_registry import (
    SequenceRegistry,
    SequenceState,
    get_sequence_registry,
    reset_sequence_registry,
)

STEPS = ["calculator.add", "calculator.multiply"]


def test_create_advance_to_completion(backend: SharedBackend) -> None:
    registry = SequenceRegistry(backend)
    state = registry.create(
        sequence_id="s1", steps=STEPS, return_to="greeter", thread_id="t", from_id="greeter", initial_payload="<A/>"
    )
    assert state == SequenceState("s1", STEPS, "greeter", "t", "greeter", last_result="<A/>")
    assert registry.get("s1") == state
    assert (state.current_step, state.remaining_steps, state.is_complete) == ("calculator.add", STEPS, False)
    state = registry.advance("s1", step_result="<B/>")
    assert state is not None
    assert (state.current_index, state.current_step, state.last_result) == (1, "calculator.multiply", "<B/>")
    state = registry.advance("s1", "<C/>")
    assert state is not None
    assert (state.results, state.is_complete, state.current_step, state.remaining_steps) == (
        ["<B/>", "<C/>"],
        True,
        None,
        [],
    )
    assert registry.list_active() == ["s1"]
    assert registry.remove("s1") is True
    assert registry.remove("s1") is False


def test_a_failed_sequence_stays_failed(backend: SharedBackend) -> None:
    registry = SequenceRegistry(backend)
    registry.create("s1", STEPS, "greeter", "t", "greeter")
    state = registry.mark_failed("s1", step="calculator.add", error="XSD validation failed")
    assert state is not None
    assert (state.failed, state.failed_step, state.error) == (True, "calculator.add", "XSD validation failed")
    assert (state.is_complete, state.current_step, state.remaining_steps) == (False, None, [])
    assert registry.advance("s1", "<late/>") == state
    assert registry.mark_failed("nope", "x", "y") is None
    assert registry.advance("nope", "<x/>") is None
    registry.clear()
    assert registry.list_active() == []


def test_os_threads_advancing_at_once_each_take_their_own_step(backend: SharedBackend) -> None:
    registry = SequenceRegistry(backend)
    steps = [f"step{i}" for i in range(40)]
    registry.create("s1", steps, "me", "t", "me")
    with ThreadPoolExecutor(8) as executor:
        list(executor.map(lambda i: registry.advance("s1", f"<r{i}/>"), range(len(steps))))
    state = registry.get("s1")
    assert state is not None
    assert state.is_complete
    assert sorted(state.results) == sorted(f"<r{i}/>" for i in range(len(steps)))
    registry.remove("s1")


def test_the_process_wide_sequence_registry() -> None:
    reset_sequence_registry()
    registry = get_sequence_registry()
    assert get_sequence_registry() is registry
    reset_sequence_registry()
    assert get_sequence_registry() is not registry
    reset_sequence_registry()
