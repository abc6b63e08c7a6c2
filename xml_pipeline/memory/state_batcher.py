"""Gather the state writes of every message in flight into one round trip.

With many conversations in flight, each event-loop turn lets dozens of them
reach a write (register a thread, append history). Sent one by one, a shared
store pays a network round trip for each; the batcher instead holds the writes
made during one turn and sends them with a single :meth:`SharedBackend.apply`
at the start of the next, then wakes each writer with its own results. Nothing
is skipped or reordered: every op runs, in the order it was made, and each
caller gets the outcome of its own ops before it goes on.

A store that is not shared (the in-process dict) has no round trip to save, so
its writes run at once, without a turn of the loop in between.

A store with an event-loop client (Redis: ``writer()``) is written by
:meth:`StateBatcher.send_continuously`, which the pump runs in its task group:
one batch travels while the pump goes on with other messages and the next
batch gathers, instead of the loop waiting out each round trip and Redis's
work on it. One batch at a time, so their order is kept. Without that task
running (before the pump starts, after it stops), batches go as before.

Writes nobody waits for (forgetting a finished conversation) go in the same
batches, with a callback to run once they are made; if they fail, the failure
is logged and Redis's TTL removes the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from xml_pipeline.cancelling import raise_if_cancelling
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.memory.state_ops import StateOp

log = logging.getLogger("xml_pipeline.state")

MAX_BATCH = 1024
"""Ops in one round trip at most; a larger turn's writes go in several."""
IDLE_SECONDS = 1.0
"""How long the sender sleeps without work before it looks again (its wait, like every wait, is bounded)."""


class AsyncWriter(Protocol):
    async def apply(self, ops: Sequence[StateOp]) -> list[object]: ...


@runtime_checkable
class OverlappingBackend(Protocol):
    """A shared store whose writes can travel without holding the event loop."""

    def writer(self) -> AbstractAsyncContextManager[AsyncWriter]: ...


@dataclass(slots=True)
class _Waiter:
    start: int
    stop: int
    future: asyncio.Future[list[object]] | None
    then: Callable[[], None] | None


class StateBatcher:
    def __init__(self, backend: SharedBackend) -> None:
        self.backend = backend
        self._batching = backend.is_shared
        self.immediate = not self._batching
        """The store is not shared, so its writes run at once: ``backend.apply(ops)`` is what :meth:`run` does,
        and a caller on the hot path may call it without the coroutine."""
        self._ops: list[StateOp] = []
        self._waiters: list[_Waiter] = []
        self._scheduled = False
        self._writer: AsyncWriter | None = None
        self._work = asyncio.Event()
        self.batches = 0
        self.ops_sent = 0

    @property
    def overlaps(self) -> bool:
        """Whether :meth:`send_continuously` has anything to do for this store."""
        return self._batching and isinstance(self.backend, OverlappingBackend)

    async def send_continuously(self) -> None:
        """Send each batch on the store's event-loop client, one at a time, until cancelled."""
        if not isinstance(self.backend, OverlappingBackend):
            return
        async with self.backend.writer() as writer:
            self._writer = writer
            try:
                while True:
                    raise_if_cancelling()  # redis-py may take a cancellation in without a word
                    if not self._ops:
                        self._work.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(IDLE_SECONDS):
                                await self._work.wait()
                        continue
                    await self._send_some_async(writer)
            finally:
                self._writer = None
                self.flush()  # what came meanwhile, the synchronous way: nothing is left behind

    async def run(self, ops: Sequence[StateOp]) -> list[object]:
        """Run ``ops`` (in order, with the other writes of this turn) and return their outcomes."""
        if not self._batching:
            return self.backend.apply(ops)
        future: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()
        self._add(_Waiter(0, len(ops), future, None), ops)
        return await future

    def run_later(self, ops: Sequence[StateOp], then: Callable[[], None] | None = None) -> None:
        """Run ``ops`` with the next batch, waiting for nothing; failures are logged.

        ``then`` is called once they have been made (or have failed), so what
        follows a cleanup, e.g. telling a client its conversation is over,
        never runs ahead of it.
        """
        if not self._batching:
            try:
                self._log_failures(self.backend.apply(ops))
            except Exception as exc:
                log.warning("state cleanup failed, left to expire: %s", exc)
            self._call(then)
            return
        self._add(_Waiter(0, len(ops), None, then), ops)

    def flush(self) -> None:
        """Send what is pending now (also what the next turn would have sent)."""
        while self._ops:
            self._send_some()

    def _add(self, waiter: _Waiter, ops: Sequence[StateOp]) -> None:
        waiter.start = len(self._ops)
        self._ops.extend(ops)
        waiter.stop = len(self._ops)
        self._waiters.append(waiter)
        if self._writer is not None:
            self._work.set()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._on_turn)

    def _on_turn(self) -> None:
        self._scheduled = False
        if self._writer is not None:
            self._work.set()  # the sender started since this turn was scheduled: one batch at a time, its way
            return
        self.flush()

    def _send_some(self) -> None:
        """One round trip: whole callers' ops, up to MAX_BATCH of them (or one caller's, if more)."""
        waiters, ops = self._take()
        try:
            results = self.backend.apply(ops)
        except Exception as exc:  # the store is unreachable: every caller of this batch gets the error
            self._fail(waiters, exc)
            return
        self._deliver(waiters, results)

    async def _send_some_async(self, writer: AsyncWriter) -> None:
        waiters, ops = self._take()
        # A batch on its way is finished even when the pump stops meanwhile (the client's socket timeout
        # bounds that), so that each caller hears how its writes went and a clean stop leaves no state behind.
        sending = asyncio.ensure_future(writer.apply(ops))
        try:
            results = await asyncio.shield(sending)
        except asyncio.CancelledError:
            await self._finish(sending, waiters)
            raise
        except Exception as exc:
            self._fail(waiters, exc)
            return
        self._deliver(waiters, results)

    async def _finish(self, sending: asyncio.Future[list[object]], waiters: list[_Waiter]) -> None:
        try:
            results = await sending
        except Exception as exc:
            self._fail(waiters, exc)
        else:
            self._deliver(waiters, results)

    def _take(self) -> tuple[list[_Waiter], list[StateOp]]:
        """Whole callers' ops, up to MAX_BATCH of them (or one caller's, if more), out of the line."""
        taken = 0
        end = 0
        for waiter in self._waiters:
            if taken and waiter.stop > MAX_BATCH:
                break
            taken += 1
            end = waiter.stop
        waiters, self._waiters = self._waiters[:taken], self._waiters[taken:]
        ops, self._ops = self._ops[:end], self._ops[end:]
        for waiter in self._waiters:
            waiter.start -= end
            waiter.stop -= end
        self.batches += 1
        self.ops_sent += len(ops)
        return waiters, ops

    def _fail(self, waiters: list[_Waiter], exc: Exception) -> None:
        for waiter in waiters:
            if waiter.future is None:
                log.warning("state cleanup failed, left to expire: %s", exc)
            elif not waiter.future.done():
                waiter.future.set_exception(exc)
            self._call(waiter.then)

    def _deliver(self, waiters: list[_Waiter], results: list[object]) -> None:
        for waiter in waiters:
            mine = results[waiter.start : waiter.stop]
            if waiter.future is None:
                self._log_failures(mine)
            elif not waiter.future.done():  # a caller cancelled while waiting still had its writes made
                waiter.future.set_result(mine)
            self._call(waiter.then)

    @staticmethod
    def _call(then: Callable[[], None] | None) -> None:
        if then is None:
            return
        try:
            then()
        except Exception:
            log.exception("callback after a state write failed")

    @staticmethod
    def _log_failures(results: list[object]) -> None:
        for result in results:
            if isinstance(result, Exception):
                log.warning("state cleanup failed, left to expire: %s", result)
