"""The batcher that carries one loop turn's Redis calls as one: results, bounds and failures."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from xml_pipeline.cluster.batching import Batcher, BatchInterrupted


class Calls:
    """A stand-in for Redis: records each batch, answers each item with its double, can be held or failed."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.started.set()
        try:
            await self.release.wait()
            if self.fail_with is not None:
                raise self.fail_with
            return [2 * item for item in items]
        finally:
            self.running -= 1


async def test_the_calls_of_one_loop_turn_go_as_one_and_each_caller_gets_its_own_result() -> None:
    calls = Calls()
    batcher: Batcher[int, int] = Batcher(calls, max_batch=100, wait_seconds=5)
    results = await asyncio.gather(*(batcher.submit(item) for item in range(50)))
    assert results == [2 * item for item in range(50)]
    assert len(calls.batches) == 1
    assert sorted(calls.batches[0]) == list(range(50))


async def test_a_batch_holds_at_most_max_batch_items_and_the_rest_follow() -> None:
    calls = Calls()
    batcher: Batcher[int, int] = Batcher(calls, max_batch=7, wait_seconds=5)
    results = await asyncio.gather(*(batcher.submit(item) for item in range(30)))
    assert results == [2 * item for item in range(30)]
    assert max(len(batch) for batch in calls.batches) <= 7
    assert sorted(item for batch in calls.batches for item in batch) == list(range(30))
    assert batcher.waiting == 0


async def test_no_more_than_max_calls_are_in_flight_and_callers_meanwhile_join_the_next_batch() -> None:
    calls = Calls()
    calls.release.clear()
    batcher: Batcher[int, int] = Batcher(calls, max_batch=100, max_calls=2, wait_seconds=5)
    first = [asyncio.create_task(batcher.submit(item)) for item in range(3)]
    await calls.started.wait()
    later = [asyncio.create_task(batcher.submit(item)) for item in range(3, 40)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert calls.running <= 2
    calls.release.set()
    assert await asyncio.gather(*first, *later) == [2 * item for item in range(40)]
    assert calls.most_running <= 2
    assert len(calls.batches) < 10


async def test_a_failed_call_fails_each_of_its_callers_and_the_next_call_works() -> None:
    calls = Calls()
    calls.fail_with = RedisConnectionError("redis went away")
    batcher: Batcher[int, int] = Batcher(calls, max_batch=100, wait_seconds=5)
    outcomes = await asyncio.gather(*(batcher.submit(item) for item in range(5)), return_exceptions=True)
    assert all(isinstance(outcome, RedisConnectionError) for outcome in outcomes)
    calls.fail_with = None
    assert await asyncio.gather(*(batcher.submit(item) for item in range(5))) == [0, 2, 4, 6, 8]


async def test_a_leader_cancelled_mid_call_leaves_its_followers_uncertain_not_waiting() -> None:
    calls = Calls()
    calls.release.clear()
    batcher: Batcher[int, int] = Batcher(calls, max_batch=100, wait_seconds=5)
    leader = asyncio.create_task(batcher.submit(1))
    followers = [asyncio.create_task(batcher.submit(item)) for item in range(2, 5)]
    await calls.started.wait()
    leader.cancel()
    outcomes = await asyncio.gather(*followers, return_exceptions=True)
    assert all(isinstance(outcome, BatchInterrupted) for outcome in outcomes)
    assert all(isinstance(outcome, RedisTimeoutError) for outcome in outcomes)  # "may have run"
    with pytest.raises(asyncio.CancelledError):
        await leader
    calls.release.set()
    assert await batcher.submit(21) == 42


async def test_a_caller_waits_no_longer_than_wait_seconds() -> None:
    calls = Calls()
    calls.release.clear()
    batcher: Batcher[int, int] = Batcher(calls, max_batch=100, max_calls=1, wait_seconds=0.2)
    held = asyncio.create_task(batcher.submit(1))
    await calls.started.wait()
    with pytest.raises(RedisTimeoutError):
        await batcher.submit(2)  # no free call within 0.2 s
    calls.release.set()
    assert await held == 2
    assert await batcher.submit(3) == 6


async def test_a_leader_cancelled_before_its_call_leaves_the_batch_to_another() -> None:
    calls = Calls()
    batcher: Batcher[int, int] = Batcher(calls, max_batch=100, wait_seconds=5)
    leader = asyncio.create_task(batcher.submit(1))
    followers = [asyncio.create_task(batcher.submit(item)) for item in range(2, 6)]
    await asyncio.sleep(0)  # the leader now waits for this turn's callers to join
    leader.cancel()
    assert await asyncio.gather(*followers) == [4, 6, 8, 10]
    assert calls.batches
    assert 1 not in calls.batches[0]


async def test_a_follower_promoted_then_cancelled_passes_the_lead_on() -> None:
    calls = Calls()
    calls.release.clear()
    batcher: Batcher[int, int] = Batcher(calls, max_batch=2, max_calls=1, wait_seconds=5)
    callers = [asyncio.create_task(batcher.submit(item)) for item in range(6)]
    await calls.started.wait()  # the first batch (0, 1) is in its call; 2 leads next, waiting for the call
    calls.release.set()
    await asyncio.sleep(0)
    for caller in callers[2:4]:
        caller.cancel()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert outcomes[:2] == [0, 2]
    assert outcomes[4:] == [8, 10]
    assert batcher.waiting == 0
