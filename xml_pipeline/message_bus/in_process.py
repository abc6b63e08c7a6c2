"""The in-process engine: a pump, and the replies it keeps for clients until they collect them.

The pump hands each client a :class:`~xml_pipeline.message_bus.conversations.Submission`,
a mailbox that lives as long as someone holds it. A client of the daemon holds
nothing between requests, so this engine keeps every accepted message's
submission in a :class:`~xml_pipeline.message_bus.submissions.SubmissionTable`
and answers :meth:`InProcessEngine.collect` from it, by thread and by owner,
as the durable engine answers from Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.memory.store_watch import StoreWatch
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.client_access import IN_PROCESS, ClientAccess
from xml_pipeline.message_bus.conversations import NoMoreReplies, Reply, Submission
from xml_pipeline.message_bus.engine import Accepted, Refused
from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.message_bus.pump import Pump, PumpStats, ShutdownReport
from xml_pipeline.message_bus.submissions import SubmissionTable
from xml_pipeline.observe.events import Observation
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.process_pool.pool import CpuPool

log = logging.getLogger("xml_pipeline.pump")

SWEEP_SECONDS = 5.0
"""How often submissions whose retention ran out are dropped, so their replies stop holding memory."""


@dataclass(frozen=True, slots=True)
class CollectedReplies:
    replies: list[Reply]
    ended: bool


class InProcessEngine:
    def __init__(
        self,
        organism: Organism,
        *,
        backend: SharedBackend | None = None,
        metrics: PumpMetrics | None = None,
        reply_retention_seconds: float = 300.0,
        collect_grace_seconds: float = 5.0,
    ) -> None:
        self.pump = Pump(organism, backend=backend, metrics=metrics)
        self.replies = SubmissionTable(
            capacity=organism.limits.max_conversations,
            retention_seconds=reply_retention_seconds,
            max_bytes=organism.limits.max_reply_bytes,
        )
        self.collect_grace_seconds = collect_grace_seconds
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.pump.start()
        self._sweeper = asyncio.create_task(self._sweep_replies(), name="xml-pipeline-reply-sweep")

    async def stop(self, drain_timeout: float = 10.0) -> ShutdownReport:
        """Stop the pump, then keep the replies collectable until nobody's wait, or the grace runs out.

        The replies live in this process, so a client that has not collected
        them yet loses them when it exits; the daemon serves collection all
        the while.
        """
        report = await self.pump.stop(drain_timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        try:
            async with asyncio.timeout(self.collect_grace_seconds):
                while self.replies.uncollected():
                    await self.replies.wait_for_collection()
        except TimeoutError:
            log.warning("stopping: %d client(s) did not collect their replies in time", self.replies.uncollected())
        return report

    def reload(self, organism: Organism) -> None:
        self.pump.reload(organism)

    @property
    def healthy(self) -> bool:
        return self.pump.healthy

    async def _sweep_replies(self) -> None:
        """Until :meth:`stop` cancels it: drop the submissions whose time is up."""
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                self.replies.sweep()
            except Exception:  # a bug: say so, and keep the table bounded on the next round
                log.exception("sweeping the reply table failed")

    # ------------------------------------------------------------------ the client's door
    async def accept(self, raw: bytes, *, access: ClientAccess = IN_PROCESS) -> Accepted | Refused:
        """Inject the message and keep its submission for ``access``'s client; refused when replies pile up."""
        full = self.replies.full()
        if full is not None:
            return self.refuse(ErrorCode.OVERLOAD, f"{full}; collect them or try again later")
        submission = await self.pump.inject(raw, access=access)
        pending = submission.pending()
        if submission.closed and pending and pending[0].is_error:
            return _refused(submission)
        self.replies.add(submission, owner=access.identity)
        return Accepted(submission.thread_id)

    def refuse(self, code: ErrorCode, detail: str) -> Refused:
        return _refused(self.pump.reject(code, detail))

    async def collect(
        self, conversation: str, mode: str, timeout: float, *, owner: str | None = None
    ) -> CollectedReplies | None:
        submission = self.replies.get(conversation, owner)
        if submission is None:
            return None
        replies = await _take(submission, mode, timeout)
        self.replies.forget_if_finished(submission)
        return CollectedReplies(replies, ended=submission.closed)

    # ------------------------------------------------------------------ what status shows
    @property
    def organism(self) -> Organism:
        return self.pump.organism

    @property
    def limits(self) -> PumpLimits:
        return self.pump.limits

    @property
    def metrics(self) -> PumpMetrics:
        return self.pump.metrics

    @property
    def observe(self) -> Observation:
        return self.pump.observe

    @property
    def store_watch(self) -> StoreWatch:
        return self.pump.store_watch

    @property
    def listeners(self) -> dict[str, Listener]:
        return self.pump.listeners

    @property
    def pool(self) -> CpuPool | None:
        return self.pump.pool

    def stats(self) -> PumpStats:
        return dataclasses.replace(
            self.pump.stats(),
            uncollected_replies=self.replies.uncollected(),
            uncollected_reply_bytes=self.replies.held_bytes,
        )

    async def cluster_status(self) -> dict[str, Any] | None:
        return None  # one process: there is no cluster to show


def _refused(submission: Submission) -> Refused:
    """A submission the pump answered with its SystemError alone: the message never started a conversation."""
    error = submission.take_pending()[0]
    code = error.error_code
    assert code is not None
    return Refused(code, error.payload.message, submission.thread_id, error.envelope)


async def _take(submission: Submission, mode: str, timeout: float) -> list[Reply]:
    """Every reply that has arrived; with ``first`` or ``end``, waiting up to ``timeout`` for more."""
    replies = submission.take_pending()
    if mode == "none" or (mode == "first" and replies):
        return replies
    try:
        async with asyncio.timeout(timeout):
            while True:
                replies.append(await submission.next_reply(timeout))
                if mode == "first":
                    return replies + submission.take_pending()
    except (TimeoutError, NoMoreReplies):
        return replies
