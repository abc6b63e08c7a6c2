"""Calls made in one event-loop turn reach Redis as one call.

A daemon under load finishes many hops per loop turn, and each finish is a
script call: a round trip, a connection taken from the pool, a command packed
and a reply parsed, on the client and on Redis. Handing the turn's calls to
Redis together pays those costs once per turn instead of once per hop, and
Redis, the organism's shared bottleneck, runs one script instead of hundreds.

There is no background task: the first caller of a turn leads. It lets the
turn's other callers join (one ``sleep(0)``), takes the batch, makes the call
and hands every follower its own result or the call's error. At most
``max_calls`` batches are in flight at once; while a leader waits for a free
call, its batch keeps growing, which is what the load asks for. A batch over
``max_batch`` items leaves the rest to a new leader, promoted from among them.

A batch's error reaches each of its callers as if its own call had failed, so
callers keep the meaning of a lone call: a timeout means "may have run". A
leader cancelled mid-call leaves its followers with :class:`BatchInterrupted`,
a timeout for that reason.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from redis.exceptions import TimeoutError as RedisTimeoutError

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchInterrupted(RedisTimeoutError):
    """The call carrying this item was cancelled in flight: whether Redis ran it is unknown."""


class _Promoted:
    """Handed to a waiting follower instead of a result: lead the next batch."""


_PROMOTED = _Promoted()


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        call: Callable[[list[Item]], Awaitable[list[Result]]],
        *,
        max_batch: int,
        max_calls: int = 2,
        wait_seconds: float,
    ) -> None:
        """``call`` gets a batch and returns one result per item, in order; it must be bounded in time.

        ``wait_seconds`` bounds how long a leader waits for a free call; past
        it the leader and its batch hear a timeout, as they would from a lone
        call that took too long.
        """
        self._call = call
        self._max_batch = max_batch
        self._calls = asyncio.Semaphore(max_calls)
        self._wait_seconds = wait_seconds
        self._waiting: list[tuple[Item, asyncio.Future[Result | _Promoted]]] = []
        self._led = False
        """Whether a leader will take what is waiting now."""

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def submit(self, item: Item) -> Result:
        if not self._led:
            self._led = True
            return await self._lead(item)
        future: asyncio.Future[Result | _Promoted] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        # No deadline of its own: a follower's wait ends with its leader's call, and every step of that is
        # bounded (the wait for a free call by wait_seconds, the call by the client's socket timeout); a
        # leader that fails or is cancelled answers its followers on the way out.
        try:
            outcome = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and isinstance(future.result(), _Promoted):
                self._hand_over()  # promoted, then cancelled before leading: the others still need a leader
            raise
        if isinstance(outcome, _Promoted):
            return await self._lead(item)
        return outcome

    async def _lead(self, item: Item) -> Result:
        try:
            if self._calls.locked():
                async with asyncio.timeout(self._wait_seconds):
                    await self._calls.acquire()
            else:
                await self._calls.acquire()  # free: taken at once, no deadline needed
        except TimeoutError:
            self._hand_over()
            raise RedisTimeoutError(f"no free call to redis within {self._wait_seconds:g}s (batched call)") from None
        except BaseException:
            self._hand_over()
            raise
        try:
            try:
                await asyncio.sleep(0)  # this turn's other callers join the batch
            except BaseException:
                self._hand_over()
                raise
            others = self._waiting[: self._max_batch - 1]
            del self._waiting[: self._max_batch - 1]
            self._hand_over()
            return await self._run(item, others)
        finally:
            self._calls.release()

    def _hand_over(self) -> None:
        """Leadership passes to the oldest caller still waiting, if any; otherwise to whoever comes next."""
        while self._waiting:
            _, future = self._waiting.pop(0)
            if not future.done():
                future.set_result(_PROMOTED)
                return
        self._led = False

    async def _run(self, item: Item, others: list[tuple[Item, asyncio.Future[Result | _Promoted]]]) -> Result:
        """The leader's own result; each follower gets its own through its future."""
        try:
            results = await self._call([item, *(other for other, _ in others)])
            if len(results) != len(others) + 1:
                raise RuntimeError(f"a batched call answered {len(results)} results for {len(others) + 1} items")
        except asyncio.CancelledError:
            self._fail(others, BatchInterrupted("the batched call was cancelled in flight"))
            raise
        except Exception as exc:
            self._fail(others, exc)
            raise
        for (_, future), result in zip(others, results[1:], strict=True):
            if not future.done():
                future.set_result(result)
        return results[0]

    @staticmethod
    def _fail(others: list[tuple[Item, asyncio.Future[Result | _Promoted]]], error: BaseException) -> None:
        for _, future in others:
            if not future.done():
                future.set_exception(error)
