"""The message pump: admission, one bounded queue, handlers under limits, routing, in one process.

Flow of a message::

    inject(bytes) -> limits, parse, envelope, target, peers, payload schema   (admission)
                  -> thread (call_chains) -> record hop (recording) -> queue  (dispatch)
    dispatcher    -> global slot -> handler task                              (dispatch)
    handler task  -> listener slot -> handler (timeout) -> release slots      (dispatch, invocation)
                  -> route the result (forward / respond / None) -> queue     (routing, outputs)
    last message of a conversation done -> forget its threads and history     (lifecycle)

Handler outputs travel the same way as client input: they are written as XML,
validated against the target's schema and decoded into a fresh instance, so a
handler never shares a mutable object with another and nothing reaches a
handler that its contract does not allow.

Failures become ``SystemError`` payloads. One caused by a client's message goes
back to the client at once. One caused by a listener goes to the sender of the
failed message if that listener accepts ``SystemErrorPayload``, and otherwise
climbs the call chain to the nearest caller that does, ending at the client.

This module is the door and the frame: it takes clients' messages and starts
listeners' conversations, starts and stops the parts, and holds the listener
table. Each step is a module of its own, named above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lxml import etree

from xml_pipeline.background import run_guarded
from xml_pipeline.handler import Handler
from xml_pipeline.memory.context_buffer import ContextBuffer, set_context_buffer
from xml_pipeline.memory.factory import spec_of
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.memory.state_batcher import StateBatcher
from xml_pipeline.memory.state_ops import RegisterThread
from xml_pipeline.memory.store_watch import StoreState, StoreWatch
from xml_pipeline.message.envelope import serialize_envelope
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.admission import admit
from xml_pipeline.message_bus.call_chains import CallChains
from xml_pipeline.message_bus.client_access import IN_PROCESS, ClientAccess
from xml_pipeline.message_bus.conversations import Conversation, Submission
from xml_pipeline.message_bus.dispatch import Delivery, Dispatcher
from xml_pipeline.message_bus.error_reports import ErrorReports, error_reply
from xml_pipeline.message_bus.instruments import Instruments
from xml_pipeline.message_bus.lifecycle import ConversationEndHook, Lifecycle
from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.message_bus.outcome import Failure, Refusal
from xml_pipeline.message_bus.outputs import OutputPreparer
from xml_pipeline.message_bus.recording import Recorder
from xml_pipeline.message_bus.routing import Router
from xml_pipeline.message_bus.thread_registry import ThreadRegistry, new_thread_id, set_registry
from xml_pipeline.observe.events import Observation
from xml_pipeline.organism import Listener, Organism, register_generic
from xml_pipeline.process_pool.pool import CpuPool

if TYPE_CHECKING:
    from xml_pipeline.primitives.collector import Collector

__all__ = ["ConversationEndHook", "Pump", "PumpNotRunning", "PumpStartError", "PumpStats", "ShutdownReport"]

log = logging.getLogger("xml_pipeline.pump")


@dataclass(frozen=True, slots=True)
class PumpStats:
    listeners: int
    queue_depth: int
    in_flight: int
    conversations: int
    threads: int
    """Threads of this pump's open conversations, counted here: a status call or a
    metrics scrape never scans the shared store."""
    accepting: bool
    uncollected_replies: int = 0
    """Submissions whose replies wait in memory to be collected, as the in-process engine keeps them;
    0 from a bare pump, and from the durable engine, whose replies wait in Redis."""
    uncollected_reply_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ShutdownReport:
    drained: bool
    """True when every conversation finished before the deadline."""
    cancelled: int
    """Messages cut short at the deadline; each was reported to its client."""


class PumpNotRunning(RuntimeError):
    pass


class PumpStartError(RuntimeError):
    """The pump cannot start (its worker processes fail); the message says why."""


class Pump:
    def __init__(
        self,
        organism: Organism,
        *,
        backend: SharedBackend | None = None,
        on_conversation_end: ConversationEndHook | None = None,
        metrics: PumpMetrics | None = None,
    ) -> None:
        self.organism = organism
        self._instruments = Instruments(metrics if metrics is not None else PumpMetrics(), Observation())
        self.limits = organism.limits
        self._xml_limits = organism.limits.xml_limits()
        self._outputs = OutputPreparer(self._xml_limits)
        self._listeners: dict[str, Listener] = dict(organism.listeners)
        self.registry = ThreadRegistry(backend)
        shared = self.registry.backend
        self.buffer = ContextBuffer(
            shared,
            max_slots_per_thread=self.limits.max_slots_per_thread,
            max_threads=self.limits.max_conversations,
        )
        self.state = StateBatcher(shared)
        self.store_watch = StoreWatch(shared)
        self._chains = CallChains()
        """Every thread of this pump's live conversations: routing reads here, never the store."""
        self._lifecycle = Lifecycle(
            self._chains,
            self.buffer,
            self.state,
            self._instruments,
            max_conversations=self.limits.max_conversations,
            on_conversation_end=on_conversation_end,
        )
        self._recorder = Recorder(
            self.buffer, self.state, self._chains, max_slots_per_thread=self.limits.max_slots_per_thread
        )
        self._reports = ErrorReports(self._instruments)
        self._dispatcher = Dispatcher(
            self.limits, self._xml_limits, self._lifecycle, self._reports, self._instruments, self._process_pool
        )
        self._router = Router(
            lambda: self._listeners,
            self._outputs,
            self._chains,
            self._recorder,
            self._reports,
            self._instruments,
            self._dispatcher.enqueue,
        )
        self._pool: CpuPool | None = None
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._accepting = False
        self.started_at: float | None = None

    @property
    def metrics(self) -> PumpMetrics:
        return self._instruments.metrics

    @metrics.setter
    def metrics(self, metrics: PumpMetrics) -> None:
        self._instruments.metrics = metrics

    @property
    def observe(self) -> Observation:
        return self._instruments.observe

    @observe.setter
    def observe(self, observe: Observation) -> None:
        self._instruments.observe = observe

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start dispatching. The pump's registry and buffer become the process-wide
        ones (``get_registry()``, ``get_context_buffer()``) so handlers can reach them."""
        if self._runner is not None:
            raise RuntimeError("the pump is already running")
        self._dispatcher.open()
        self._lifecycle.idle = asyncio.Event()
        self._lifecycle.idle.set()
        set_registry(self.registry)
        set_context_buffer(self.buffer)
        if "system.sequence" not in self._listeners:
            from xml_pipeline.primitives import install_primitives  # the primitives are built on the pump

            install_primitives(self)
        self._runner = asyncio.create_task(self._run(), name="xml-pipeline-pump")
        self._runner.add_done_callback(self._on_runner_done)
        if any(listener.cpu_bound for listener in self._listeners.values()):
            try:
                await self._process_pool().warm_up()
            except BrokenProcessPool as exc:
                await self._process_pool().close(kill=True)
                self._pool = None
                raise PumpStartError(f"the worker processes for cpu_bound listeners could not start: {exc}") from None
        self._accepting = True
        self.started_at = time.monotonic()
        log.info("pump started organism=%s listeners=%d", self.organism.name, len(self._listeners))

    async def __aenter__(self) -> Pump:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self, drain_timeout: float = 10.0) -> ShutdownReport:
        """Refuse new messages, let in-flight conversations finish, then cancel what is left.

        Everything cut short at the deadline is reported to its client as
        ``shutting-down``; nothing disappears without a reply and a log line.
        """
        runner = self._runner
        if runner is None:
            return ShutdownReport(drained=True, cancelled=0)
        self._accepting = False
        idle = self._lifecycle.idle
        assert idle is not None
        drained = True
        if not runner.done():
            try:
                async with asyncio.timeout(drain_timeout):
                    await idle.wait()
            except TimeoutError:
                drained = False
        cancelled = self._lifecycle.pending_total
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        self._dispatcher.abandon_queued()  # taken by no dispatcher: report each
        if self._pool is not None:
            await self._pool.close(kill=not drained)
            self._pool = None
        await self.store_watch.close()
        self.state.flush()
        self._runner = None
        log.info("pump stopped organism=%s drained=%s cancelled=%d", self.organism.name, drained, cancelled)
        return ShutdownReport(drained=drained, cancelled=cancelled)

    def _on_runner_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._accepting = False
            log.critical("pump dispatcher died: %r", task.exception(), exc_info=task.exception())

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._dispatcher.run(group, self._router), name="xml-pipeline-dispatcher")
            if self.store_watch.needed:
                group.create_task(self.store_watch.run(), name="xml-pipeline-store-watch")
            if self.state.overlaps:
                group.create_task(self.state.send_continuously(), name="xml-pipeline-state-writes")

    def run_background(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """Run ``work`` in the pump's task group: it ends with the pump, and its errors are logged."""
        if self._group is None:
            work.close()
            raise PumpNotRunning("the pump is not running")
        run_guarded(self._group, work, name, log)

    # ------------------------------------------------------------------ listeners
    @property
    def listeners(self) -> dict[str, Listener]:
        return self._listeners

    def register_generic_listener(
        self,
        name: str,
        handler: Handler,
        payload_classes: Iterable[type],
        *,
        peers: Iterable[str] | None = None,
        timeout_seconds: float = 30.0,
        max_concurrency: int = 16,
        description: str = "",
        accepts_any: bool = False,
        coordinator: bool = False,
        eager: bool = False,
    ) -> Listener:
        """Add a listener while running, e.g. a short-lived collector of replies."""
        return register_generic(
            self._listeners,
            Listener(
                name,
                payload_classes,
                handler,
                peers=peers,
                timeout_seconds=timeout_seconds,
                max_concurrency=max_concurrency,
                description=description,
                system=name.startswith("system."),
                accepts_any=accepts_any,
                coordinator=coordinator,
                eager=eager,
            ),
        )

    async def start_internal(
        self,
        initiator: str,
        target_name: str,
        payload: Any,
        on_started: Callable[[str], None],
        on_end: Callable[[], None] | None = None,
        *,
        checked: etree._Element | None = None,
    ) -> Failure | None:
        """Start a conversation from listener ``initiator`` to ``target_name``.

        The target's answer (or error) comes back to ``initiator`` as a message.
        ``on_started`` gets the conversation id before anything can answer, so
        the initiator can match the answer to the call; ``on_end`` is called
        when the conversation ends, whether an answer came back or not.
        ``checked``: the element ``payload`` was freshly decoded from after the
        target's schema passed it, so it is only held to the limits
        (:meth:`OutputPreparer.checked`), not written, checked and decoded again.
        """
        target = self._listeners.get(target_name)
        if target is None:
            return Failure(ErrorCode.UNKNOWN_TARGET, f"no listener is named {target_name!r}")
        if checked is None:
            prepared = self._outputs.for_listener(target, payload, initiator)
        else:
            prepared = self._outputs.checked(payload, checked, initiator, target_name)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        lifecycle = self._lifecycle
        if lifecycle.full:
            return Failure(ErrorCode.OVERLOAD, "too many conversations are open; try again later")
        conversation = Conversation(new_thread_id(), initiator, None, on_end=on_end)
        thread, registrations = lifecycle.open(conversation, target_name)
        on_started(conversation.id)
        lifecycle.begin_one(conversation)  # held while the writes are made, so it cannot end under them
        try:
            recorder = self._recorder
            if recorder.immediate:
                failure = recorder.record_now(
                    conversation, initiator, target_name, thread, fresh, payload_xml, registrations
                )
            else:
                failure = await recorder.record(
                    conversation, initiator, target_name, thread, fresh, payload_xml, registrations
                )
            if failure is None:
                delivery = Delivery(target, fresh, payload_xml, initiator, thread, conversation)
                failure = await self._dispatcher.enqueue(conversation, delivery)
        finally:
            lifecycle.finish_one(conversation)  # with nothing queued, the conversation ends here
        return failure

    def caller(self, kind: str, run_id: str, *, concurrency: int) -> Collector:
        """A caller for one run of a primitive: an ephemeral listener that the answers come back to."""
        from xml_pipeline.primitives.collector import Collector  # the primitives are built on the pump

        return Collector(self, kind, run_id, concurrency=concurrency)

    def unregister_listener(self, name: str) -> bool:
        """Remove a listener; messages already dispatched to it still finish."""
        return self._listeners.pop(name, None) is not None

    def reload(self, organism: Organism) -> None:
        """Swap in a reloaded organism's listeners; ephemeral ones stay.

        Messages already queued or running keep the listener they were given;
        everything routed from now on uses the new table. Limits are fixed for
        the pump's lifetime.
        """
        ephemeral = {name: lst for name, lst in self._listeners.items() if name not in self.organism.listeners}
        self._listeners = {**organism.listeners, **ephemeral}
        self.organism = organism

    @property
    def healthy(self) -> bool:
        """True while the dispatcher runs and the shared state has not been lost for good."""
        runs = self._runner is not None and not self._runner.done()
        return runs and self.store_watch.health.state is not StoreState.LOST

    def stats(self) -> PumpStats:
        return PumpStats(
            listeners=len(self._listeners),
            queue_depth=self._dispatcher.depth,
            in_flight=self._dispatcher.running,
            conversations=len(self._lifecycle.live),
            threads=len(self._chains),
            accepting=self._accepting,
        )

    # ------------------------------------------------------------------ ingress
    async def inject_payload(
        self,
        payload: Any,
        to: str,
        *,
        sender: str = "console",
        thread: str | None = None,
        access: ClientAccess = IN_PROCESS,
    ) -> Submission:
        """Wrap ``payload`` in an envelope and :meth:`inject` it, exactly as a client would."""
        element = codec_for(type(payload)).to_element(payload)
        return await self.inject(serialize_envelope(sender, to, thread or new_thread_id(), element), access=access)

    async def inject(self, raw: bytes, *, access: ClientAccess = IN_PROCESS) -> Submission:
        """Accept one envelope from a client. Never raises for bad input: a refused
        message comes back as a Submission whose first reply is the SystemError.

        ``access`` says what this client may send; the default, for code in this
        process (tests, embedding programs), may call any listener. Doors to the
        outside pass the client's own (``ClientAccess.anonymous()`` at least)."""
        if not self._accepting:
            return self._refuse(Refusal(ErrorCode.SHUTTING_DOWN, "the daemon is not accepting messages"))
        try:
            admitted = admit(raw, self._listeners, self._xml_limits, access)
        except Exception as exc:  # a bug, or lxml refusing in a way we did not foresee: never a crash
            log.exception("internal error while admitting a message")
            admitted = Refusal(ErrorCode.INTERNAL, f"the message could not be checked: {type(exc).__name__}")
        if isinstance(admitted, Refusal):
            return self._refuse(admitted)
        listener, payload, payload_xml, envelope = (
            admitted.listener,
            admitted.payload,
            admitted.payload_xml,
            admitted.envelope,
        )
        sender, thread = envelope.sender, envelope.thread
        conversation, delivery_thread, registrations = self._assign_thread(
            sender, listener.name, thread, access.identity
        )
        if conversation is None:
            return self._refuse(
                Refusal(
                    ErrorCode.OVERLOAD,
                    "too many conversations are open; try again later",
                    sender,
                    thread,
                    listener.name,
                )
            )
        assert conversation.submission is not None
        lifecycle = self._lifecycle
        lifecycle.begin_one(conversation)  # counted before the writes, so a drain waits for it
        try:
            failure = await self._recorder.record(
                conversation, sender, listener.name, delivery_thread, payload, payload_xml, registrations
            )
        except BaseException:  # cancelled while the writes were made: the message was never queued
            lifecycle.finish_one(conversation)
            raise
        if failure is None and not self.healthy:
            failure = Failure(ErrorCode.SHUTTING_DOWN, "the daemon stopped before this message could be queued")
        instruments = self._instruments
        if failure is None:
            hop = instruments.observe.hop(
                conversation.id, sender, listener.name, delivery_thread, type(payload), payload_xml
            )
            delivery = Delivery(listener, payload, payload_xml, sender, delivery_thread, conversation, hop)
            if not self._dispatcher.offer(delivery):
                failure = Failure(ErrorCode.OVERLOAD, "the pump's queue is full; try again later")
        if failure is None:
            instruments.metrics.ingress(accepted=True)
        else:
            instruments.metrics.ingress(accepted=False)
            self._reports.to_client(conversation, failure.code, failure.detail, listener.name)
            lifecycle.finish_one(conversation)
        return conversation.submission

    def reject(self, code: ErrorCode, detail: str) -> Submission:
        """Refuse a message the door could not even read (too large, too slow): the same SystemError and log line."""
        return self._refuse(Refusal(code, detail))

    def _assign_thread(
        self, sender: str, to: str, thread: str, identity: str | None
    ) -> tuple[Conversation | None, str, list[RegisterThread]]:
        """Continue the sender's own live thread, or start a new conversation (None when none may start)."""
        conversation = self._chains.continued_by(thread, sender, identity)
        if conversation is not None:
            delivery_thread, registrations = self._chains.extend(thread, to)
            return conversation, delivery_thread, registrations
        if self._lifecycle.full:
            return None, thread, []
        conversation_id = new_thread_id()
        conversation = Conversation(
            conversation_id, sender, Submission(conversation_id, self.limits.mailbox_size), identity=identity
        )
        delivery_thread, registrations = self._lifecycle.open(conversation, to)
        return conversation, delivery_thread, registrations

    def _refuse(self, refusal: Refusal) -> Submission:
        """A client message that never became part of a conversation: answer it directly."""
        submission = Submission(refusal.thread or new_thread_id(), self.limits.mailbox_size)
        submission.deliver(error_reply(refusal.code, refusal.detail, to=refusal.sender, thread=submission.thread_id))
        submission.close()
        self.metrics.ingress(accepted=False)
        self._reports.note(
            refusal.code,
            refusal.detail,
            listener=refusal.target,
            thread=submission.thread_id,
            sender=refusal.sender,
            conversation=submission.thread_id,
        )
        return submission

    # ------------------------------------------------------------------ the process pool
    def _process_pool(self) -> CpuPool:
        if self._pool is None:
            settings = self.organism.settings.get("process_pool", {})
            self._pool = CpuPool(
                workers=settings.get("workers"),
                max_tasks_per_child=settings.get("max_tasks_per_child"),
                backend_spec=spec_of(self.buffer.backend),
                max_slots_per_thread=self.limits.max_slots_per_thread,
                max_threads=self.limits.max_conversations,
            )
        return self._pool

    @property
    def pool(self) -> CpuPool | None:
        """The process pool, once a cpu_bound listener has needed it."""
        return self._pool
