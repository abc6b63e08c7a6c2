"""Dispatch: one bounded queue, and each message's handler run under the pump's limits.

The dispatcher takes a message off the queue once a global slot (``max_in_flight``)
is free and runs its handler in a task of its own, which then waits for a slot
of its listener (``max_concurrency``; a bounded wait) and calls the handler
under its timeout. Slots are released before the result is routed, so a
handler waiting for queue space never holds the capacity that the dispatcher
needs to drain the queue. Coordinators (the primitives' runs) take no global
slot: they wait on the messages they send, which need the slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xml_pipeline.handler import HandlerMetadata
from xml_pipeline.memory.shared_backend import BackendUnavailable
from xml_pipeline.message.payload_codec import payload_type_name
from xml_pipeline.message.safe_xml import XmlLimits
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.conversations import Conversation
from xml_pipeline.message_bus.deadlines import Deadlines
from xml_pipeline.message_bus.eager import run_now
from xml_pipeline.message_bus.error_reports import ErrorReports
from xml_pipeline.message_bus.instruments import Instruments
from xml_pipeline.message_bus.invocation import call_at_once, call_in_worker, call_watched
from xml_pipeline.message_bus.lifecycle import Lifecycle
from xml_pipeline.message_bus.outcome import Failure
from xml_pipeline.message_bus.slots import Slots
from xml_pipeline.organism import Listener, PumpLimits
from xml_pipeline.process_pool.pool import CpuPool
from xml_pipeline.process_pool.worker import Task

if TYPE_CHECKING:
    from xml_pipeline.message_bus.routing import Router

log = logging.getLogger("xml_pipeline.pump")


@dataclass(slots=True)
class Delivery:
    """A validated message on its way to a handler."""

    listener: Listener
    payload: Any
    payload_xml: bytes
    sender: str
    thread: str
    conversation: Conversation
    hop: str = ""
    """Its reference for whoever observes (:mod:`xml_pipeline.observe`)."""
    task: asyncio.Task[None] | None = None
    """The task its handler runs in, once the dispatcher has made it (what a deadline cancels)."""


class Dispatcher:
    def __init__(
        self,
        limits: PumpLimits,
        xml_limits: XmlLimits,
        lifecycle: Lifecycle,
        reports: ErrorReports,
        instruments: Instruments,
        pool: Callable[[], CpuPool],
    ) -> None:
        self._limits = limits
        self._xml_limits = xml_limits
        self._lifecycle = lifecycle
        self._reports = reports
        self._instruments = instruments
        self._pool = pool
        self._queue: asyncio.Queue[Delivery] | None = None
        self._slots: Slots | None = None
        self._deadlines = Deadlines()
        self.running = 0
        """Handler calls running now."""

    def open(self) -> None:
        """Make the queue and the global slots (in the running loop, as the pump starts)."""
        self._queue = asyncio.Queue(self._limits.queue_size)
        self._slots = Slots(self._limits.max_in_flight)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # ------------------------------------------------------------------ queueing
    def offer(self, delivery: Delivery) -> bool:
        """Queue a client's message if there is room now; a client is never kept waiting for it."""
        assert self._queue is not None
        try:
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            return False
        return True

    async def enqueue(self, conversation: Conversation, delivery: Delivery) -> Failure | None:
        """Queue an internal message, waiting for room (bounded); the failure if there is none."""
        assert self._queue is not None
        self._lifecycle.begin_one(conversation)
        delivery.hop = self._instruments.observe.hop(
            conversation.id,
            delivery.sender,
            delivery.listener.name,
            delivery.thread,
            type(delivery.payload),
            delivery.payload_xml,
        )
        if not self._queue.full():  # only a wait needs a deadline; room is taken at once
            self._queue.put_nowait(delivery)
            return None
        try:  # wait_for, not asyncio.timeout: an eager handler's failure may be routed in the dispatcher's turn
            await asyncio.wait_for(self._queue.put(delivery), self._limits.enqueue_timeout_seconds)
        except asyncio.CancelledError:
            self._lifecycle.finish_one(conversation)
            raise
        except TimeoutError:
            self._lifecycle.finish_one(conversation)
            waited = self._limits.enqueue_timeout_seconds
            return Failure(ErrorCode.OVERLOAD, f"the pump's queue stayed full for {waited:g}s")
        return None

    def abandon_queued(self) -> None:
        """Report every message still queued (the dispatcher has stopped): none will be handled."""
        assert self._queue is not None
        while not self._queue.empty():
            self._abandon(self._queue.get_nowait())

    def _abandon(self, delivery: Delivery) -> None:
        """A queued message that will never be handled (shutdown): report it and count it done."""
        name = delivery.listener.name
        detail = f"the daemon stopped before {name} could handle this message"
        self._reports.to_client(delivery.conversation, ErrorCode.SHUTTING_DOWN, detail, name)
        self._lifecycle.finish_one(delivery.conversation)

    # ------------------------------------------------------------------ dispatching
    async def run(self, group: asyncio.TaskGroup, router: Router) -> None:
        """Dispatch until cancelled, each handler in a task of ``group``; ``router`` takes what it returns.

        Each wake-up takes every message that is ready, not one: a turn of the
        loop that queued a hundred messages costs the dispatcher one wait.
        """
        assert self._queue is not None
        assert self._slots is not None
        queue, slots = self._queue, self._slots
        while True:
            delivery = await queue.get()
            while True:
                if not delivery.listener.coordinator and not slots.try_take():
                    try:
                        await slots.take()
                    except asyncio.CancelledError:
                        self._abandon(delivery)
                        raise
                listener = delivery.listener
                if listener.eager and listener.slots.try_take():
                    run_now(self._handle(delivery, router, eager=True), group, listener.name)
                else:
                    delivery.task = group.create_task(self._handle(delivery, router))
                try:
                    delivery = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break

    async def _handle(self, delivery: Delivery, router: Router, *, eager: bool = False) -> None:
        """Handle one message: its handler under the limits, then its result routed.

        ``eager``: the listener's slot is taken and the handler returns without
        awaiting (:attr:`Listener.eager`), so this runs in the dispatcher's turn.
        """
        conversation, name = delivery.conversation, delivery.listener.name
        try:
            assert self._slots is not None
            self._instruments.metrics.message_in(name)
            try:
                outcome = await self._invoke(delivery, eager)
            finally:
                if not delivery.listener.coordinator:
                    self._slots.release()
            self._instruments.observe.handled(outcome)
            if isinstance(outcome, Failure):
                await router.failed(delivery, outcome)
            else:
                await router.route(delivery, outcome)
        except asyncio.CancelledError:
            self._reports.to_client(conversation, ErrorCode.SHUTTING_DOWN, f"{name} was stopped at shutdown", name)
            raise
        except BackendUnavailable as exc:
            self._reports.to_client(
                conversation, ErrorCode.BACKEND_UNAVAILABLE, f"routing {name}'s result failed: {exc}", name
            )
        except Exception:  # a bug in the pump itself: report it, never let it vanish
            log.exception("internal error listener=%s thread=%s", name, delivery.thread)
            self._reports.to_client(
                conversation, ErrorCode.INTERNAL, "internal error in the pump; the daemon log has details", name
            )
        finally:
            self._lifecycle.finish_one(conversation)

    async def _invoke(self, delivery: Delivery, eager: bool) -> Any:
        """Run the handler under its listener's limits; a Failure if it did not finish well."""
        listener = delivery.listener
        try:
            # an eager call's slot is taken already; only a wait needs a deadline, a free slot is taken at once
            if not eager and not listener.slots.try_take():
                async with asyncio.timeout(self._limits.enqueue_timeout_seconds):
                    await listener.slots.take()
        except TimeoutError:
            waited = self._limits.enqueue_timeout_seconds
            return Failure(ErrorCode.OVERLOAD, f"{listener.name} stayed saturated for {waited:g}s")
        try:
            metadata = HandlerMetadata(
                thread_id=delivery.thread,
                from_id=delivery.sender,
                own_name=listener.name,
                conversation_id=delivery.conversation.id,
                is_self_call=delivery.sender == listener.name,
            )
            self.running += 1
            observe = self._instruments.observe
            observe.handling(delivery.hop, delivery.conversation.id, listener.name)
            started = time.perf_counter()
            try:
                if listener.cpu_bound:
                    task = Task(
                        handler_path=listener.handler_path,
                        payload_type=payload_type_name(type(delivery.payload)),
                        payload_xml=delivery.payload_xml,
                        metadata=metadata,
                        timeout=listener.timeout_seconds,
                        traceparent=observe.traceparent(),
                    )
                    return await call_in_worker(self._pool(), listener, task, self._xml_limits)
                if eager:
                    return await call_at_once(listener, delivery.payload, metadata, delivery.payload_xml)
                assert delivery.task is not None
                return await call_watched(listener, delivery.payload, metadata, self._deadlines, delivery.task)
            finally:
                self.running -= 1
                self._instruments.metrics.handler_finished(listener.name, time.perf_counter() - started)
        finally:
            listener.slots.release()
