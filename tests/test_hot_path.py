"""The pump's hot-path parts on their own: slots, shared deadlines, thread ids."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from xml_pipeline.message_bus.deadlines import Deadlines
from xml_pipeline.message_bus.slots import Slots
from xml_pipeline.message_bus.thread_registry import new_thread_id


async def test_a_released_slot_goes_to_the_longest_waiter_not_to_a_newcomer() -> None:
    slots = Slots(1)
    assert slots.try_take()
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.take()
        order.append(name)

    first = asyncio.create_task(wait("first"))
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0)
    slots.release()
    assert not slots.try_take()  # handed to "first", who has not run yet: not free for anyone else
    await first
    assert order == ["first"]
    assert slots.free == 0
    slots.release()
    await second
    assert order == ["first", "second"]
    slots.release()
    assert slots.free == 1
    assert not slots.locked()


async def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_the_slot_on() -> None:
    slots = Slots(1)
    assert slots.try_take()
    handed = asyncio.create_task(slots.take())
    next_in_line = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.release()  # to `handed`, which is cancelled before it can run
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    await next_in_line
    assert slots.free == 0
    slots.release()
    assert slots.free == 1


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    slots = Slots(1)
    assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.locked()
    slots.release()
    assert slots.free == 1
    assert not slots.locked()


async def test_a_call_past_its_deadline_is_cancelled_and_reported_as_a_timeout() -> None:
    deadlines = Deadlines()
    outcome: list[str] = []

    async def call() -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = deadlines.watch(task, 0.05)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if deadlines.finish(watch, 0.05, cancelled=True):
                outcome.append("timed out")
                return
            raise
        deadlines.finish(watch, 0.05)

    task = asyncio.create_task(call())
    await task
    assert outcome == ["timed out"]
    assert task.cancelling() == 0  # the deadline's cancellation was taken back
    assert len(deadlines) == 0


async def test_a_cancellation_from_elsewhere_is_never_taken_for_a_timeout() -> None:
    deadlines = Deadlines()
    started = asyncio.Event()

    async def call() -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = deadlines.watch(task, 30)
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert not deadlines.finish(watch, 30, cancelled=True)
            raise

    task = asyncio.create_task(call())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_finished_calls_are_let_go_even_behind_a_slow_one() -> None:
    deadlines = Deadlines()
    task = asyncio.current_task()
    assert task is not None
    slow = deadlines.watch(task, 30)
    for _ in range(10_000):
        deadlines.finish(deadlines.watch(task, 30), 30)
    assert len(deadlines) <= 2 * 64 + 1
    deadlines.finish(slow, 30)
    deadlines.finish(deadlines.watch(task, 30), 30)
    assert len(deadlines) == 0


def test_thread_ids_read_ahead_are_never_handed_out_twice_even_across_a_fork() -> None:
    parent = [new_thread_id() for _ in range(3)]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(writer, " ".join(new_thread_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader) as pipe:
        forked = pipe.read().split()
    ids = parent + forked + [new_thread_id() for _ in range(3)]
    assert len(set(ids)) == len(ids) == 9
    for value in ids:
        parsed = uuid.UUID(value)
        assert (str(parsed), parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)
