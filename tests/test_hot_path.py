"""The pump's hot-path parts: slots, shared deadlines, thread ids, handlers run in the dispatcher's turn."""

from __future__ import annotations

import asyncio
import contextvars
import os
import uuid

import pytest

from tests.support import Ping, Pong
from xml_pipeline import ErrorCode, HandlerMetadata, HandlerResponse
from xml_pipeline.message_bus.conversations import NoMoreReplies, Reply, Submission
from xml_pipeline.message_bus.deadlines import Deadlines
from xml_pipeline.message_bus.eager import run_now
from xml_pipeline.message_bus.slots import Slots
from xml_pipeline.message_bus.thread_registry import new_thread_id
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.testing import ask, running


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


_SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


async def test_work_run_now_that_never_waits_needs_no_task() -> None:
    done: list[str] = []

    async def quick() -> None:
        _SEEN.set("quick")
        done.append(_SEEN.get())

    async with asyncio.TaskGroup() as group:
        before = len(asyncio.all_tasks())
        run_now(quick(), group, "quick")
        assert done == ["quick"]
        assert len(asyncio.all_tasks()) == before
    assert _SEEN.get() == ""  # it ran in a context of its own, as a task's


async def test_work_run_now_that_waits_is_carried_on_by_a_task_in_its_own_context() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    done: list[str] = []

    async def slow() -> None:
        _SEEN.set("slow")
        done.append(await gate + _SEEN.get())

    async with asyncio.TaskGroup() as group:
        run_now(slow(), group, "slow")
        assert done == []
        gate.set_result("opened by ")
    assert done == ["opened by slow"]


async def test_a_carrier_cancelled_before_its_first_step_cancels_the_work_where_it_waits() -> None:
    reached: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            reached.append("cancelled at its wait")
            raise

    async def failing_group() -> None:
        async with asyncio.TaskGroup() as group:
            run_now(slow(), group, "slow")
            raise RuntimeError("the group fails before the carrier's first step, so it is cancelled")

    with pytest.raises(ExceptionGroup):
        await failing_group()
    assert reached == ["cancelled at its wait"]


async def test_an_eager_listener_whose_handler_awaits_after_all_still_answers() -> None:
    async def slow_echo(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        await asyncio.sleep(0.01)
        return HandlerResponse.respond(Pong(payload.text))

    organism = Organism.of("eager", [Listener("slow", [Ping], slow_echo, eager=True)])
    async with running(organism) as pump:
        replies = await asyncio.gather(*(ask(pump, Ping(f"n{i}"), to="slow") for i in range(20)))
    assert sorted(reply.payload.text for reply in replies) == sorted(f"n{i}" for i in range(20))


async def test_an_eager_listener_that_raises_is_reported_like_any_other() -> None:
    async def broken(payload: Ping, metadata: HandlerMetadata) -> None:
        raise RuntimeError("broken at once")

    organism = Organism.of("eager", [Listener("broken", [Ping], broken, eager=True)])
    async with running(organism) as pump:
        reply = await ask(pump, Ping("x"), to="broken")
    assert reply.error_code is ErrorCode.HANDLER_ERROR
    assert "broken at once" in reply.payload.message


def reply(text: str) -> Reply:
    return Reply(sender="echo", to="console", thread="t", payload=Pong(text), envelope=text.encode())


async def test_a_wait_for_a_reply_times_out_and_leaves_nothing_behind() -> None:
    submission = Submission("t", capacity=10)
    with pytest.raises(TimeoutError):
        await submission.next_reply(0.01)
    assert submission._waiters == []
    submission.deliver(reply("late"))
    assert (await submission.next_reply(0.01)).payload == Pong("late")


async def test_two_readers_each_get_one_reply_and_the_end_wakes_the_rest() -> None:
    submission = Submission("t", capacity=10)
    readers = [asyncio.create_task(submission.next_reply(5)) for _ in range(3)]
    await asyncio.sleep(0)
    submission.deliver(reply("one"))
    await asyncio.sleep(0)
    submission.deliver(reply("two"))
    await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
    await asyncio.sleep(0)
    submission.close()
    outcomes = await asyncio.gather(*readers, return_exceptions=True)
    got = sorted(outcome.payload.text for outcome in outcomes if isinstance(outcome, Reply))
    assert got == ["one", "two"]
    assert sum(isinstance(outcome, NoMoreReplies) for outcome in outcomes) == 1
    assert submission._waiters == []


async def test_a_cancelled_reader_does_not_take_a_reply_from_another() -> None:
    submission = Submission("t", capacity=10)
    cancelled = asyncio.create_task(submission.next_reply(5))
    waiting = asyncio.create_task(submission.next_reply(5))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    submission.deliver(reply("kept"))
    assert (await waiting).payload == Pong("kept")
    assert cancelled.cancelled()
    assert submission._waiters == []


def test_deadlines_still_fire_for_a_pump_started_again_in_another_loop() -> None:
    deadlines = Deadlines()
    outcomes: list[bool] = []

    async def call(seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = deadlines.watch(task, seconds)
        try:
            await asyncio.sleep(seconds * 4)
        except asyncio.CancelledError:
            outcomes.append(deadlines.finish(watch, seconds, cancelled=True))
            return
        outcomes.append(deadlines.finish(watch, seconds))

    async def first_loop() -> None:  # leaves its timer armed for a far deadline, then its loop ends
        task = asyncio.current_task()
        assert task is not None
        deadlines.finish(deadlines.watch(task, 0.001), 0.001)
        deadlines.finish(deadlines.watch(task, 30), 30)

    asyncio.run(first_loop())
    asyncio.run(call(0.05))
    assert outcomes == [True]
