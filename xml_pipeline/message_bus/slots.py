"""Concurrency slots for the hot path: the pump's ``max_in_flight`` and each listener's ``max_concurrency``.

An ``asyncio.Semaphore`` would do, but every message takes two and on Python
3.11 each ``acquire`` scans its waiters; here taking a free slot is one
comparison, and a released slot goes straight to the longest waiter (FIFO),
so a newcomer cannot take it ahead of someone who waited.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    __slots__ = ("_waiters", "free")

    def __init__(self, count: int) -> None:
        self.free = count
        """Slots nobody holds (and nobody has been handed)."""
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        """A take would have to wait."""
        return self.free <= 0 or bool(self._waiters)

    def try_take(self) -> bool:
        """Take a slot if one is free now, without waiting; True if taken."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Take a slot, waiting in line for one (callers bound the wait)."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled: pass it on
                self.release()
            elif waiter in self._waiters:  # a release may already have passed it by
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back: to the longest waiter still waiting, else to the free ones."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1
