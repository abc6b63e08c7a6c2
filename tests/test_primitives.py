"""system.sequence and system.buffer: orchestration on top of the pump."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.primitive_support import Ack, Count, add_one, double, fail_on_sevens, puzzled
from tests.support import Ping
from tests.test_pump import Gate
from workers.cpu import Crunch, Crunched, checksum, crunch
from xml_pipeline import HandlerMetadata, HandlerResponse
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message_bus.buffer_registry import BufferRegistry, get_buffer_registry, new_run_id
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.message_bus.sequence_registry import get_sequence_registry
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.primitives import (
    BufferComplete,
    BufferDispatched,
    BufferError,
    BufferStart,
    SequenceComplete,
    SequenceError,
    SequenceStart,
)
from xml_pipeline.primitives.collector import Collector, _Call
from xml_pipeline.testing import ask, running


def xml(payload: Any) -> str:
    return codec_for(type(payload)).to_bytes(payload).decode()


def value_of(result_xml: str) -> int:
    return int(codec_for(Count).from_bytes(result_xml.encode()).value)


class Sink:
    """A return_to target: remembers what it got and acknowledges it."""

    def __init__(self) -> None:
        self.received: list[Any] = []

    async def handler(self, payload: Any, metadata: HandlerMetadata) -> HandlerResponse:
        self.received.append(payload)
        return HandlerResponse.respond(Ack(type(payload).__name__))


def organism(*extra: Listener) -> Organism:
    return Organism.of(
        "orchestra",
        [
            Listener("add1", [Count], add_one, max_concurrency=1000),
            Listener("double", [Count], double),
            Listener("sevens", [Count], fail_on_sevens, max_concurrency=1000),
            Listener("puzzled", [Count], puzzled),
            *extra,
        ],
    )


def assert_nothing_left(pump: Pump) -> None:
    assert [name for name in pump.listeners if name.count(".") > 1] == []
    assert get_buffer_registry().list_active() == []
    assert get_sequence_registry().list_active() == []
    assert pump.registry.debug_dump() == {}
    assert pump.buffer.list_threads() == []
    assert pump.stats().conversations == 0


@pytest.fixture
async def pump() -> AsyncIterator[Pump]:
    async with running(organism()) as started_pump:
        yield started_pump
        report = await started_pump.stop(drain_timeout=10)  # abandoned slow items finish first
        assert report.drained
        assert_nothing_left(started_pump)


# ---------------------------------------------------------------- sequences


@pytest.mark.parametrize(
    ("steps", "expected"),
    [(["add1"], 1), (["add1", "double", "add1"], 3), (["add1"] * 10, 10)],
    ids=["1 step", "3 steps", "10 steps"],
)
async def test_sequences_feed_each_output_to_the_next_step(pump: Pump, steps: list[str], expected: int) -> None:
    reply = await ask(pump, SequenceStart(steps=steps, payload=xml(Count(0)), sequence_id="mine"), to="system.sequence")
    assert reply.payload == SequenceComplete("mine", xml(Count(expected)), len(steps))


async def test_a_failing_middle_step_ends_the_sequence_naming_it(pump: Pump) -> None:
    reply = await ask(
        pump, SequenceStart(steps=["add1", "sevens", "add1"], payload=xml(Count(6))), to="system.sequence"
    )
    assert isinstance(reply.payload, SequenceError)
    assert (reply.payload.failed_step, reply.payload.step_index) == ("sevens", 1)
    assert "handler-error" in reply.payload.error
    assert "7 is a multiple of seven" in reply.payload.error


async def test_an_error_payload_answer_ends_the_sequence(pump: Pump) -> None:
    reply = await ask(
        pump, SequenceStart(steps=["add1", "puzzled", "add1"], payload=xml(Count(1))), to="system.sequence"
    )
    assert isinstance(reply.payload, SequenceError)
    assert (reply.payload.failed_step, reply.payload.step_index) == ("puzzled", 1)
    assert "did not understand" in reply.payload.error


async def test_a_step_that_cannot_take_the_previous_output_fails_there(pump: Pump) -> None:
    pump.register_generic_listener("pings", add_one, [Ping])
    reply = await ask(pump, SequenceStart(steps=["add1", "pings"], payload=xml(Count(1))), to="system.sequence")
    assert isinstance(reply.payload, SequenceError)
    assert (reply.payload.failed_step, reply.payload.step_index) == ("pings", 1)
    assert "bad-response" in reply.payload.error
    pump.unregister_listener("pings")


async def test_unknown_steps_are_rejected_up_front(pump: Pump) -> None:
    reply = await ask(pump, SequenceStart(steps=["add1", "ghost", "add1"], payload=xml(Count(1))), to="system.sequence")
    assert reply.payload == SequenceError("", "ghost", 1, "unknown step 'ghost': no listener has that name")
    empty = await ask(pump, SequenceStart(steps=[], payload=xml(Count(1))), to="system.sequence")
    assert isinstance(empty.payload, SequenceError)
    bad_payload = await ask(
        pump, SequenceStart(steps=["add1"], payload="<Ping><text>x</text></Ping>"), to="system.sequence"
    )
    assert isinstance(bad_payload.payload, SequenceError)
    assert "does not fit the first step" in bad_payload.payload.error


async def test_a_sequence_past_its_deadline_names_the_step_that_was_running(pump: Pump) -> None:
    async def sleepy(payload: Count, metadata: HandlerMetadata) -> HandlerResponse:
        await asyncio.sleep(1)
        return HandlerResponse.respond(payload)

    pump.register_generic_listener("sleepy", sleepy, [Count])
    stuck = SequenceStart(steps=["double", "sleepy", "add1"], payload=xml(Count(0)), timeout_seconds=0.3)
    reply = await ask(pump, stuck, to="system.sequence")
    assert isinstance(reply.payload, SequenceError)
    assert (reply.payload.failed_step, reply.payload.step_index) == ("sleepy", 1)
    assert "timed out after 0.3s while sleepy was running" in reply.payload.error
    pump.unregister_listener("sleepy")


async def test_a_step_that_answers_nothing_ends_the_sequence(pump: Pump) -> None:
    async def silent(payload: Count, metadata: HandlerMetadata) -> None:
        return None

    pump.register_generic_listener("silent", silent, [Count])
    reply = await ask(
        pump, SequenceStart(steps=["add1", "silent", "add1"], payload=xml(Count(0))), to="system.sequence"
    )
    assert isinstance(reply.payload, SequenceError)
    assert (reply.payload.failed_step, reply.payload.error) == ("silent", "the listener ended without answering")
    pump.unregister_listener("silent")


async def test_return_to_receives_the_outcome_and_its_answer_comes_back() -> None:
    sink = Sink()
    async with running(organism(Listener("sink", [SequenceComplete, BufferComplete], sink.handler))) as pump:
        reply = await ask(
            pump, SequenceStart(steps=["add1"], payload=xml(Count(1)), return_to="sink"), to="system.sequence"
        )
        assert reply.payload == Ack("SequenceComplete")
        assert sink.received == [SequenceComplete(sink.received[0].sequence_id, xml(Count(2)), 1)]
        assert_nothing_left(pump)


# ---------------------------------------------------------------- buffers


@pytest.mark.parametrize("count", [1, 100, 10_000])
async def test_buffers_collect_results_in_item_order(pump: Pump, count: int) -> None:
    items = [xml(Count(i)) for i in range(count)]
    reply = await ask(
        pump, BufferStart(target="add1", items=items, buffer_id="b", max_in_flight=200), to="system.buffer", timeout=120
    )
    result = reply.payload
    assert isinstance(result, BufferComplete)
    assert (result.buffer_id, result.total, result.successful, result.timed_out) == ("b", count, count, False)
    assert [item.index for item in result.results] == list(range(count))
    assert [value_of(item.result) for item in result.results] == [i + 1 for i in range(count)]


@pytest.mark.parametrize("count", [1, 100, 10_000])
async def test_buffers_without_collect_answer_at_once_and_still_deliver_every_item(count: int) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def tally(payload: Count, metadata: HandlerMetadata) -> None:
        seen.append(payload.value)
        if len(seen) == count:
            done.set()

    async with running(organism(Listener("tally", [Count], tally, max_concurrency=1000))) as pump:
        items = [xml(Count(i)) for i in range(count)]
        reply = await ask(
            pump, BufferStart(target="tally", items=items, collect=False, buffer_id="fire"), to="system.buffer"
        )
        assert reply.payload == BufferDispatched("fire", count)
        async with asyncio.timeout(120):
            await done.wait()
        assert sorted(seen) == list(range(count))
        await pump.stop(drain_timeout=5)
        assert_nothing_left(pump)


async def test_a_target_that_fails_on_some_items_marks_just_those(pump: Pump) -> None:
    items = [xml(Count(i)) for i in range(1, 30)]
    result = (await ask(pump, BufferStart(target="sevens", items=items), to="system.buffer")).payload
    assert isinstance(result, BufferComplete)
    failed = [item.index for item in result.results if not item.success]
    assert failed == [i - 1 for i in range(1, 30) if i % 7 == 0]
    assert result.successful == 29 - len(failed)
    assert all("multiple of seven" in result.results[index].error for index in failed)


async def test_a_buffer_past_its_deadline_completes_with_partial_results(pump: Pump) -> None:
    items = [xml(Count(i, delay=0 if i < 5 else 1.5)) for i in range(8)]
    result = (await ask(pump, BufferStart(target="add1", items=items, timeout_seconds=0.5), to="system.buffer")).payload
    assert isinstance(result, BufferComplete)
    assert result.timed_out is True
    assert [item.success for item in result.results] == [True] * 5 + [False] * 3
    assert all("no answer within the buffer's 0.5s deadline" in item.error for item in result.results[5:])


async def test_max_in_flight_bounds_the_fan_out() -> None:
    gate = Gate()
    async with running(organism(Listener("gate", [Ping], gate.handler, max_concurrency=100))) as pump:
        items = [f"<Ping><text>{i}</text></Ping>" for i in range(20)]
        buffer = asyncio.create_task(
            ask(pump, BufferStart(target="gate", items=items, max_in_flight=3), to="system.buffer")
        )
        await gate.wait_for_active(3)
        gate.opened.set()
        result = (await buffer).payload
        assert result.successful == 20
        assert gate.most_active == 3


async def test_bad_buffer_requests_get_buffer_error(pump: Pump) -> None:
    empty = await ask(pump, BufferStart(target="add1", items=[], buffer_id="e"), to="system.buffer")
    assert empty.payload == BufferError("e", "a buffer needs at least one item")
    unknown = await ask(pump, BufferStart(target="ghost", items=[xml(Count(1))], buffer_id="u"), to="system.buffer")
    assert unknown.payload == BufferError("u", "unknown target 'ghost': no listener has that name")
    flood = await ask(pump, BufferStart(target="add1", items=[xml(Count(1))], max_in_flight=0), to="system.buffer")
    assert isinstance(flood.payload, BufferError)


async def test_items_may_be_multi_line_documents_and_bad_items_fail_alone(pump: Pump) -> None:
    items = ["<Count>\n  <value>\n    41\n  </value>\n</Count>\n", "<Count><value>x</value></Count>", "not xml"]
    result = (await ask(pump, BufferStart(target="add1", items=items), to="system.buffer")).payload
    assert [item.success for item in result.results] == [True, False, False]
    assert value_of(result.results[0].result) == 42
    assert "item is not a valid payload" in result.results[1].error


async def test_a_buffer_item_may_run_a_sequence(pump: Pump) -> None:
    items = [xml(SequenceStart(steps=["add1", "double"], payload=xml(Count(i)))) for i in range(5)]
    result = (await ask(pump, BufferStart(target="system.sequence", items=items), to="system.buffer")).payload
    assert isinstance(result, BufferComplete)
    finals = [codec_for(SequenceComplete).from_bytes(item.result.encode()) for item in result.results]
    assert [value_of(final.final_result) for final in finals] == [(i + 1) * 2 for i in range(5)]


async def test_ids_are_unguessable_and_shared_labels_do_not_collide(pump: Pump) -> None:
    ephemeral: list[str] = []
    original = pump.register_generic_listener

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        ephemeral.append(name)
        return original(name, *args, **kwargs)

    pump.register_generic_listener = spy  # type: ignore[method-assign]
    first, second = await asyncio.gather(
        ask(pump, BufferStart(target="add1", items=[xml(Count(1))], buffer_id="same"), to="system.buffer"),
        ask(pump, BufferStart(target="add1", items=[xml(Count(100))], buffer_id="same"), to="system.buffer"),
    )
    pump.register_generic_listener = original  # type: ignore[method-assign]
    assert [value_of(first.payload.results[0].result), value_of(second.payload.results[0].result)] == [2, 101]
    assert len(ephemeral) == 2
    assert all(re.fullmatch(r"system\.buffer\.[0-9a-f]{32}", name) for name in ephemeral)
    assert len(set(ephemeral)) == 2


async def test_an_item_answered_twice_keeps_its_first_answer(pump: Pump) -> None:
    registry = BufferRegistry(pump.buffer.backend)
    state = registry.create(new_run_id(), 1, "", "t", "console", "add1")
    assert registry.record_result(state.buffer_id, 0, "<first/>") is not None
    again = registry.record_result(state.buffer_id, 0, "", success=False, error="second")
    assert again is not None
    assert (again.results[0].result, again.completed_count, again.successful_count) == ("<first/>", 1, 1)
    registry.remove(state.buffer_id)
    # and the collector resolves each call once, ignoring a repeated answer
    with Collector(pump, "buffer", "test", concurrency=1) as collector:
        call = _Call(collector._waiting)
        call.started("conversation")
        metadata = HandlerMetadata("t", "add1", collector.name, "conversation")
        await collector._receive(Count(1), metadata)
        await collector._receive(Count(2), metadata)
        assert call.answer.result() == Count(1)


async def test_fifty_sequences_and_buffers_at_once_do_not_mix(pump: Pump) -> None:
    sequences = [
        ask(pump, SequenceStart(steps=["add1", "add1"], payload=xml(Count(i * 1000))), to="system.sequence")
        for i in range(50)
    ]
    buffers = [
        ask(pump, BufferStart(target="double", items=[xml(Count(i * 1000 + j)) for j in range(10)]), to="system.buffer")
        for i in range(50)
    ]
    answers = await asyncio.gather(*sequences, *buffers)
    assert [value_of(answer.payload.final_result) for answer in answers[:50]] == [i * 1000 + 2 for i in range(50)]
    for i, answer in enumerate(answers[50:]):
        assert [value_of(item.result) for item in answer.payload.results] == [2 * (i * 1000 + j) for j in range(10)]


async def test_buffer_with_a_cpu_bound_target_on_shared_backends(shared_backend: SharedBackend) -> None:
    backend = shared_backend
    cruncher = Listener("cruncher", [Crunch], crunch, cpu_bound=True, timeout_seconds=20)
    cpu = organism(cruncher)
    cpu.settings = {"process_pool": {"workers": 2}}
    async with running(cpu, backend=backend) as pump:
        items = [xml(Crunch(f"item{i}", 50)) for i in range(20)]
        start = BufferStart(target="cruncher", items=items, max_in_flight=4)
        submission = await pump.inject_payload(start, "system.buffer")
        (reply,) = await submission.collect(60)  # to the end: its state is cleaned up before the mailbox closes
        result = reply.payload
        assert result.successful == 20
        crunched = [codec_for(Crunched).from_bytes(item.result.encode()) for item in result.results]
        assert [c.checksum for c in crunched] == [checksum(f"item{i}", 50) for i in range(20)]
        assert all(c.history_seen == 1 for c in crunched)  # each item is its own conversation, visible to the worker
        assert len({c.worker_pid for c in crunched}) >= 1
        assert_nothing_left(pump)


@dataclass(frozen=True)
class Leaf:
    value: int


@dataclass(frozen=True)
class Middle:
    leaf: Leaf


@dataclass(frozen=True)
class Nested:
    middle: Middle


@dataclass(frozen=True)
class Outer:
    nested: Nested


def calls_to(monkeypatch: pytest.MonkeyPatch, owner: object, method: str) -> list[object]:
    """The argument of every call of ``owner.method`` from now on, which still does what it did."""
    calls: list[object] = []
    original = getattr(owner, method)

    def counted(argument: Any) -> Any:
        calls.append(argument)
        return original(argument)

    monkeypatch.setattr(owner, method, counted)
    return calls


async def nested_echo(payload: Outer, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Count(payload.nested.middle.leaf.value))


async def test_buffer_items_are_checked_against_the_targets_schema_once(
    pump: Pump, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks = calls_to(monkeypatch, codec_for(Count), "validate")
    items = [xml(Count(i)) for i in range(5)]
    result = (await ask(pump, BufferStart(target="add1", items=items), to="system.buffer")).payload
    assert len(checks) == 5 + 5  # each item on its way out, each answer on its way back: never twice
    assert [value_of(item.result) for item in result.results] == [1, 2, 3, 4, 5]


async def test_a_checked_buffer_item_is_still_held_to_the_depth_bound_of_an_outgoing_payload() -> None:
    """An item document exactly ``max_depth`` deep parses, but inside an envelope it would be one deeper."""
    shallow = Organism.of(
        "shallow", [Listener("nested", [Outer], nested_echo)], PumpLimits(max_depth=5, max_message_bytes=4096)
    )
    item = xml(Outer(Nested(Middle(Leaf(7)))))
    async with running(shallow) as pump:
        result = (await ask(pump, BufferStart(target="nested", items=[item]), to="system.buffer")).payload
    assert isinstance(result, BufferComplete)
    assert not result.results[0].success
    assert "deeper than the limit of 5" in result.results[0].error


async def test_a_primitives_outcome_is_written_and_checked_but_not_decoded_again(
    pump: Pump, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded = calls_to(monkeypatch, codec_for(BufferComplete), "from_element")
    reply = await ask(pump, BufferStart(target="add1", items=[xml(Count(1))]), to="system.buffer")
    assert isinstance(reply.payload, BufferComplete)
    assert decoded == []  # the buffer made it and keeps nothing of it: the client gets it without a copy


async def test_each_answer_is_kept_as_the_xml_it_arrived_as_not_written_again(
    pump: Pump, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_again(payload: Any) -> str:
        raise AssertionError(f"{payload!r} was written out again")

    monkeypatch.setattr("xml_pipeline.primitives.buffer.encode", not_again)
    items = [xml(Count(i)) for i in range(3)]
    result = (await ask(pump, BufferStart(target="add1", items=items), to="system.buffer")).payload
    assert [item.result for item in result.results] == [xml(Count(i + 1)) for i in range(3)]
