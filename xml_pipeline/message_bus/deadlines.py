"""Handler timeouts with one timer for all of them, instead of an ``asyncio.timeout`` per call.

Every handler call runs under its listener's ``timeout_seconds``. An
``asyncio.timeout`` per call schedules and cancels a timer handle each time,
a cost on every hop for a deadline that almost never fires. Here a call is
one entry in its timeout's line: calls with the same timeout expire in the
order they started, so each line is in deadline order, and one timer, set for
the earliest deadline of all lines, wakes up to cancel the calls that overran
and is set again. A call that finished is only marked; the lines drop marked
entries from their heads as they go, and are compacted if a slow call at the
head holds many finished ones behind it, so they stay as long as the calls in
flight.

An overrun call's task is cancelled; :meth:`Watch.close` tells the caller
whether that cancellation was the deadline's (then it is taken back, as
``asyncio.timeout`` does, and the call is a timeout) or someone else's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class Watch:
    """One handler call under a deadline."""

    __slots__ = ("_cancelling", "_task", "at", "expired", "finished")

    def __init__(self, task: asyncio.Task[Any], at: float) -> None:
        self._task = task
        self._cancelling = task.cancelling()
        self.at = at
        self.expired = False
        """The deadline passed before the call finished, and its task was cancelled."""
        self.finished = False

    def close(self, cancelled: bool) -> bool:
        """The call is over (``cancelled``: it ended with CancelledError); True if it ran out of time.

        The deadline's own cancellation is taken back, so the task carries on
        as if it had never been cancelled; any other one stays.
        """
        self.finished = True
        if not self.expired:
            return False
        remaining = self._task.uncancel()
        return cancelled and remaining <= self._cancelling


class Deadlines:
    def __init__(self) -> None:
        self._lines: dict[float, deque[Watch]] = {}
        self._live: dict[float, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        """Entries held (finished ones not dropped yet included): bounded by the calls in flight."""
        return sum(len(line) for line in self._lines.values())

    def watch(self, task: asyncio.Task[Any], seconds: float) -> Watch:
        """Start the deadline of a call that runs in ``task``; :meth:`finish` it when the call is over."""
        loop = task.get_loop()
        entry = Watch(task, loop.time() + seconds)
        line = self._lines.get(seconds)
        if line is None:
            line = self._lines[seconds] = deque()
            self._live[seconds] = 0
        line.append(entry)
        self._live[seconds] += 1
        if self._timer is None or entry.at < self._timer_at or loop is not self._timer_loop:
            self._arm(loop, entry.at)  # (a pump started again in another loop: its old timer never fires)
        return entry

    def finish(self, entry: Watch, seconds: float, *, cancelled: bool = False) -> bool:
        """The call of ``entry`` (watched for ``seconds``) is over; True if it ran out of time."""
        timed_out = entry.close(cancelled)
        if not entry.expired:
            self._live[seconds] -= 1
            line = self._lines[seconds]
            while line and line[0].finished:
                line.popleft()
            if len(line) > 64 and len(line) > 2 * self._live[seconds]:  # a slow call holds finished ones back
                self._lines[seconds] = deque(watch for watch in line if not watch.finished)
        return timed_out

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at, self._timer_loop = at, loop
        self._timer = loop.call_at(at, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel every call past its deadline, then set the timer for the next deadline."""
        self._timer = None
        now = loop.time()
        earliest: float | None = None
        for seconds, line in self._lines.items():
            while line and (line[0].finished or line[0].at <= now):
                entry = line.popleft()
                if not entry.finished:
                    entry.expired = True
                    self._live[seconds] -= 1
                    entry._task.cancel()
            if line and (earliest is None or line[0].at < earliest):
                earliest = line[0].at
        if earliest is not None:
            self._arm(loop, earliest)
