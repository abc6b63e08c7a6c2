"""Client submissions by thread, kept until their replies are collected or expire.

An HTTP client posts a message and comes back for the replies, maybe after the
conversation has ended. The in-process engine keeps each submission here until
the client has collected everything after the end, or until
``retention_seconds`` after the end. It is bounded, in submissions and in the
bytes of replies not collected yet: when either is full, new messages are
refused (503, ``overload``) rather than evicting replies nobody has read. The
check comes before a message is taken, and a message taken always has its
submission kept, so the table can pass its capacity by the few messages that
were being taken at that moment, never by more.

Each submission belongs to the client that posted it: with tokens, only that
client can collect its replies; a request with another identity (or none) is
told there is nothing for it, exactly as for an unknown thread.
"""

from __future__ import annotations

import asyncio
import time

from xml_pipeline.message_bus.conversations import Submission


class SubmissionTable:
    def __init__(self, *, capacity: int, retention_seconds: float, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.capacity = capacity
        self.retention_seconds = retention_seconds
        self.max_bytes = max_bytes
        self.held_bytes = 0
        """Bytes of replies in the table's submissions that nobody has collected yet."""
        self._holding = 0
        """Submissions with replies nobody has collected yet, counted as they change so that reading is free."""
        self._by_thread: dict[str, Submission] = {}
        self._owners: dict[str, str | None] = {}
        self._collected = asyncio.Event()

    def add(self, submission: Submission, owner: str | None = None) -> None:
        """Keep ``submission`` for client ``owner`` (its token's identity; None without a token)."""
        if submission.thread_id in self._by_thread:
            return
        self._by_thread[submission.thread_id] = submission
        self._owners[submission.thread_id] = owner
        self.held_bytes += submission.pending_bytes
        self._holding += submission.pending_bytes > 0
        submission.keep_account(lambda delta: self._count(submission, delta))

    def _count(self, submission: Submission, delta: int) -> None:
        """``submission`` now holds ``delta`` bytes more (an envelope is never empty, so bytes held mean replies)."""
        self.held_bytes += delta
        after = submission.pending_bytes
        self._holding += (after > 0) - (after - delta > 0)

    def full(self) -> str | None:
        """Why no new message may be taken now, if it may not: too many submissions, or too many bytes held."""
        if self.held_bytes > self.max_bytes:
            return f"{self.held_bytes} bytes of replies are waiting to be collected (the limit is {self.max_bytes})"
        if len(self._by_thread) >= self.capacity:
            self.sweep()
            if len(self._by_thread) >= self.capacity:
                return f"{self.capacity} submissions are waiting to be collected"
        return None

    def _drop(self, thread: str) -> None:
        submission = self._by_thread.pop(thread)
        self._owners.pop(thread, None)
        submission.keep_account(None)
        self.held_bytes -= submission.pending_bytes
        self._holding -= submission.pending_bytes > 0

    def get(self, thread_id: str, owner: str | None = None) -> Submission | None:
        """The submission on ``thread_id`` if ``owner`` posted it."""
        if thread_id not in self._by_thread or self._owners[thread_id] != owner:
            return None
        return self._by_thread[thread_id]

    def forget_if_finished(self, submission: Submission) -> None:
        """Called after a client collected replies; wakes :meth:`wait_for_collection`."""
        if submission.finished and submission.thread_id in self._by_thread:
            self._drop(submission.thread_id)
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
            self._drop(thread)
        return len(expired)

    def uncollected(self) -> int:
        """Submissions still holding replies nobody has read."""
        return self._holding

    def __len__(self) -> int:
        return len(self._by_thread)
