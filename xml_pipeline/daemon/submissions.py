"""Client submissions by thread, kept until their replies are collected or expire.

An HTTP client posts a message and comes back for the replies, maybe after the
conversation has ended. The table keeps each submission until the client has
collected everything after the end, or until ``retention_seconds`` after the
end. It is bounded: when full, new submissions are refused (503) rather than
evicting replies nobody has read.

Each submission belongs to the client that posted it: with tokens, only that
client can collect its replies; a request with another identity (or none) is
told there is nothing for it, exactly as for an unknown thread.
"""

from __future__ import annotations

import asyncio
import time

from xml_pipeline.message_bus.conversations import Submission


class SubmissionTableFull(Exception):
    pass


class SubmissionTable:
    def __init__(self, *, capacity: int, retention_seconds: float) -> None:
        self.capacity = capacity
        self.retention_seconds = retention_seconds
        self._by_thread: dict[str, Submission] = {}
        self._owners: dict[str, str | None] = {}
        self._collected = asyncio.Event()

    def add(self, submission: Submission, owner: str | None = None) -> None:
        """Keep ``submission`` for client ``owner`` (its token's identity; None without a token)."""
        if submission.thread_id in self._by_thread:
            return
        if len(self._by_thread) >= self.capacity:
            self.sweep()
            if len(self._by_thread) >= self.capacity:
                raise SubmissionTableFull(f"{self.capacity} submissions are waiting to be collected")
        self._by_thread[submission.thread_id] = submission
        self._owners[submission.thread_id] = owner

    def get(self, thread_id: str, owner: str | None = None) -> Submission | None:
        """The submission on ``thread_id`` if ``owner`` posted it."""
        if thread_id not in self._by_thread or self._owners[thread_id] != owner:
            return None
        return self._by_thread[thread_id]

    def forget_if_finished(self, submission: Submission) -> None:
        """Called after a client collected replies; wakes :meth:`wait_for_collection`."""
        if submission.finished:
            self._by_thread.pop(submission.thread_id, None)
            self._owners.pop(submission.thread_id, None)
        self._collected.set()

    async def wait_for_collection(self) -> None:
        """Until some client collects replies (callers bound this with a timeout)."""
        self._collected.clear()
        await self._collected.wait()

    def sweep(self, now: float | None = None) -> int:
        """Drop finished submissions and those whose retention ran out; return how many."""
        now = time.monotonic() if now is None else now
        expired = [
            thread
            for thread, submission in self._by_thread.items()
            if submission.finished
            or (submission.closed_at is not None and now - submission.closed_at > self.retention_seconds)
        ]
        for thread in expired:
            del self._by_thread[thread], self._owners[thread]
        return len(expired)

    def uncollected(self) -> int:
        """Submissions still holding replies nobody has read."""
        return sum(1 for submission in self._by_thread.values() if submission.pending())

    def __len__(self) -> int:
        return len(self._by_thread)
