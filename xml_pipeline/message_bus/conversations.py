"""Conversations in flight, and the mailboxes where clients collect replies.

A conversation starts when a client's message is accepted and ends when none of
its messages is queued or being handled any more. Counting is exact because a
handler's output is counted before its input is let go, so the count cannot
touch zero mid-flight. At the end the pump deletes the conversation's threads
and history; the client's mailbox stays with the client's Submission until the
client drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xml_pipeline.message.system_payloads import ErrorCode, SystemErrorPayload

log = logging.getLogger("xml_pipeline.pump")


class NoMoreReplies(LookupError):
    """The conversation has ended and every reply has been collected."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A message addressed to a client (not a listener)."""

    sender: str
    to: str
    thread: str
    payload: Any
    envelope: bytes

    @property
    def is_error(self) -> bool:
        return isinstance(self.payload, SystemErrorPayload)

    @property
    def error_code(self) -> ErrorCode | None:
        return self.payload.code if isinstance(self.payload, SystemErrorPayload) else None


class Submission:
    """A client's handle on what it sent: the thread to watch, and its replies.

    ``thread_id`` is the conversation's root thread, where replies arrive; for
    a message refused before it could start a conversation it is the thread the
    client sent (or a fresh one if none could be read).
    """

    def __init__(self, thread_id: str, capacity: int) -> None:
        self.thread_id = thread_id
        self._replies: deque[Reply] = deque()
        self._capacity = capacity
        self._waiters: list[asyncio.Future[None]] = []
        """Readers waiting for a reply (or the end), each woken once."""
        self._closed = False
        self.closed_at: float | None = None
        self.dropped = 0
        self.pending_bytes = 0
        """Bytes of the replies that arrived and were not collected yet."""
        self._ledger: Callable[[int], None] | None = None

    def keep_account(self, ledger: Callable[[int], None] | None) -> None:
        """Tell ``ledger`` of every change in :attr:`pending_bytes` (a table that bounds them all); None stops."""
        self._ledger = ledger

    def _count(self, delta: int) -> None:
        self.pending_bytes += delta
        if self._ledger is not None:
            self._ledger(delta)

    def deliver(self, reply: Reply) -> bool:
        if len(self._replies) >= self._capacity:
            self.dropped += 1
            log.error(
                "reply dropped: mailbox full thread=%s from=%s capacity=%d",
                reply.thread,
                reply.sender,
                self._capacity,
            )
            return False
        self._replies.append(reply)
        self._count(len(reply.envelope))
        self._wake()
        return True

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """No more replies will come; waiting readers wake up."""
        if not self._closed:
            self.closed_at = time.monotonic()
        self._closed = True
        self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> list[Reply]:
        """The replies that arrived and were not collected yet, without waiting."""
        return list(self._replies)

    def take_pending(self) -> list[Reply]:
        """Collect every reply that has arrived, without waiting."""
        replies = list(self._replies)
        self._replies.clear()
        self._count(-self.pending_bytes)
        return replies

    @property
    def finished(self) -> bool:
        """The conversation has ended and every reply has been collected."""
        return self._closed and not self._replies

    async def next_reply(self, timeout: float) -> Reply:
        """The next reply; TimeoutError if none comes in time, NoMoreReplies at the end.

        A reply already here is taken at once; only a wait sets a timer (a
        client waits on every round trip, so no ``asyncio.timeout`` per call).
        """
        if not self._replies:
            await self._wait(timeout)
        reply = self._replies.popleft()
        self._count(-len(reply.envelope))
        return reply

    async def _wait(self, timeout: float) -> None:
        """Until a reply is here; TimeoutError after ``timeout`` seconds, NoMoreReplies at the end."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._replies:
            if self._closed:
                raise NoMoreReplies(self.thread_id)
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_at(deadline, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                with contextlib.suppress(ValueError):  # gone already if a reply or the end woke it
                    self._waiters.remove(waiter)

    async def collect(self, timeout: float) -> list[Reply]:
        """Every reply until the conversation ends; TimeoutError if it does not end in time."""
        replies: list[Reply] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    replies.append(await self.next_reply(timeout))
                except NoMoreReplies:
                    return replies


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


@dataclass(eq=False, slots=True)
class Conversation:
    id: str
    initiator: str
    submission: Submission | None
    pending: int = 0
    chains: dict[tuple[str, ...], str] = field(default_factory=dict)
    """Every thread of the conversation, by call chain. The pump that owns the
    conversation is the only one that adds to it, so it routes from here and
    writes each new thread to the shared registry for handlers to read."""
    on_end: Callable[[], None] | None = None
    """For conversations a listener started: told when the conversation ends, answered or not."""
    identity: str | None = None
    """The token identity of the client that opened it, None without one: only that client continues it."""
