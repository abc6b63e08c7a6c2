"""The message pump: one bounded queue, one dispatcher, handlers under limits.

Flow of a message::

    inject(bytes) -> limits, parse, envelope, target, peers, payload schema,
                     thread -> record hop -> queue
    dispatcher    -> global slot -> handler task
    handler task  -> listener slot -> handler (timeout) -> release slots
                  -> route the result (forward / respond / None) -> queue

Handler outputs travel the same way as client input: they are written as XML,
validated against the target's schema and decoded into a fresh instance, so a
handler never shares a mutable object with another and nothing reaches a
handler that its contract does not allow.

Failures become ``SystemError`` payloads. One caused by a client's message goes
back to the client at once. One caused by a listener goes to the sender of the
failed message if that listener accepts ``SystemErrorPayload``, and otherwise
climbs the call chain to the nearest caller that does, ending at the client.

Slots are released before a result is routed, so a handler waiting for queue
space never holds the capacity that the dispatcher needs to drain the queue.
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
from xml_pipeline.handler import Handler, HandlerMetadata, HandlerResponse
from xml_pipeline.memory.context_buffer import BufferSlot, ContextBuffer, set_context_buffer
from xml_pipeline.memory.factory import spec_of
from xml_pipeline.memory.shared_backend import BackendUnavailable, BufferFull, SharedBackend, TooManyThreads
from xml_pipeline.memory.state_batcher import StateBatcher
from xml_pipeline.memory.state_ops import DeleteHistory, ForgetThread, RegisterThread, StateOp
from xml_pipeline.memory.store_watch import StoreState, StoreWatch
from xml_pipeline.message.envelope import (
    envelope_bytes,
    serialize_envelope,
)
from xml_pipeline.message.payload_codec import (
    codec_for,
    payload_type_name,
)
from xml_pipeline.message.system_payloads import ErrorCode, SystemErrorPayload
from xml_pipeline.message_bus.admission import admit
from xml_pipeline.message_bus.client_access import IN_PROCESS, ClientAccess
from xml_pipeline.message_bus.conversations import Conversation, Reply, Submission
from xml_pipeline.message_bus.invocation import call_in_process, call_in_worker
from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.message_bus.outcome import Failure, Refusal, error_payload
from xml_pipeline.message_bus.outputs import OutputPreparer
from xml_pipeline.message_bus.thread_registry import Pruned, ThreadRegistry, chain_key, new_thread_id, set_registry
from xml_pipeline.observe.events import Observation
from xml_pipeline.organism import Listener, Organism, register_generic
from xml_pipeline.process_pool.pool import CpuPool
from xml_pipeline.process_pool.worker import Task

if TYPE_CHECKING:
    from xml_pipeline.primitives.collector import Collector

log = logging.getLogger("xml_pipeline.pump")

SYSTEM_SENDER = "system"

ConversationEndHook = Callable[[str, tuple[BufferSlot, ...]], None]


@dataclass(slots=True)
class _Delivery:
    """A validated message on its way to a handler."""

    listener: Listener
    payload: Any
    payload_xml: bytes
    sender: str
    thread: str
    conversation: Conversation
    hop: str = ""
    """Its reference for whoever observes (:mod:`xml_pipeline.observe`)."""


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
    """Clients whose replies wait, kept by the engine, to be collected (in Redis for the durable one: 0 here)."""
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
        self.metrics = metrics if metrics is not None else PumpMetrics()
        self.observe = Observation()
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
        self._on_conversation_end = on_conversation_end
        self._conversations: dict[str, Conversation] = {}
        self._threads: dict[str, tuple[Conversation, tuple[str, ...]]] = {}
        """Every thread of this pump's live conversations: routing reads here, never the store."""
        self._pending_total = 0
        self._running = 0
        self._pool: CpuPool | None = None
        self._group: asyncio.TaskGroup | None = None
        self._idle: asyncio.Event | None = None
        self._queue: asyncio.Queue[_Delivery] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._runner: asyncio.Task[None] | None = None
        self._accepting = False
        self.started_at: float | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start dispatching. The pump's registry and buffer become the process-wide
        ones (``get_registry()``, ``get_context_buffer()``) so handlers can reach them."""
        if self._runner is not None:
            raise RuntimeError("the pump is already running")
        self._queue = asyncio.Queue(self.limits.queue_size)
        self._slots = asyncio.Semaphore(self.limits.max_in_flight)
        self._idle = asyncio.Event()
        self._idle.set()
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
        assert self._idle is not None
        assert self._queue is not None
        drained = True
        if not runner.done():
            try:
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
            except TimeoutError:
                drained = False
        cancelled = self._pending_total
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        while not self._queue.empty():  # taken by no dispatcher: report each
            self._abandon(self._queue.get_nowait())
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
            group.create_task(self._dispatch(group), name="xml-pipeline-dispatcher")
            if self.store_watch.needed:
                group.create_task(self.store_watch.run(), name="xml-pipeline-store-watch")

    def run_background(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """Run ``work`` in the pump's task group: it ends with the pump, and its errors are logged."""
        if self._group is None:
            work.close()
            raise PumpNotRunning("the pump is not running")
        run_guarded(self._group, work, name, log)

    async def _dispatch(self, group: asyncio.TaskGroup) -> None:
        assert self._queue is not None
        assert self._slots is not None
        queue, slots = self._queue, self._slots
        while True:
            delivery = await queue.get()
            if not delivery.listener.coordinator:
                try:
                    await slots.acquire()
                except asyncio.CancelledError:
                    self._abandon(delivery)
                    raise
            group.create_task(self._handle(delivery))

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
            ),
        )

    async def start_internal(
        self,
        initiator: str,
        target_name: str,
        payload: Any,
        on_started: Callable[[str], None],
        on_end: Callable[[], None] | None = None,
    ) -> Failure | None:
        """Start a conversation from listener ``initiator`` to ``target_name``.

        The target's answer (or error) comes back to ``initiator`` as a message.
        ``on_started`` gets the conversation id before anything can answer, so
        the initiator can match the answer to the call; ``on_end`` is called
        when the conversation ends, whether an answer came back or not.
        """
        target = self._listeners.get(target_name)
        if target is None:
            return Failure(ErrorCode.UNKNOWN_TARGET, f"no listener is named {target_name!r}")
        prepared = self._outputs.for_listener(target, payload, initiator)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        if len(self._conversations) >= self.limits.max_conversations:
            return Failure(ErrorCode.OVERLOAD, "too many conversations are open; try again later")
        conversation = Conversation(new_thread_id(), initiator, None, on_end=on_end)
        thread, registrations = self._open(conversation, target_name)
        on_started(conversation.id)
        self._begin_one(conversation)  # held while the writes are made, so it cannot end under them
        try:
            failure = await self._record(
                conversation, initiator, target_name, thread, fresh, payload_xml, registrations
            )
            if failure is None:
                delivery = _Delivery(target, fresh, payload_xml, initiator, thread, conversation)
                failure = await self._enqueue(conversation, delivery)
        finally:
            self._finish_one(conversation)  # with nothing queued, the conversation ends here
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
            queue_depth=self._queue.qsize() if self._queue is not None else 0,
            in_flight=self._running,
            conversations=len(self._conversations),
            threads=len(self._threads),
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
        conversation, delivery_thread, registrations = self._assign_thread(sender, listener.name, thread)
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
        self._begin_one(conversation)  # counted before the writes, so a drain waits for it
        try:
            failure = await self._record(
                conversation, sender, listener.name, delivery_thread, payload, payload_xml, registrations
            )
        except BaseException:  # cancelled while the writes were made: the message was never queued
            self._finish_one(conversation)
            raise
        if failure is None and not self.healthy:
            failure = Failure(ErrorCode.SHUTTING_DOWN, "the daemon stopped before this message could be queued")
        if failure is None:
            assert self._queue is not None
            hop = self.observe.hop(conversation.id, sender, listener.name, delivery_thread, type(payload), payload_xml)
            try:
                self._queue.put_nowait(
                    _Delivery(listener, payload, payload_xml, sender, delivery_thread, conversation, hop)
                )
            except asyncio.QueueFull:
                failure = Failure(ErrorCode.OVERLOAD, "the pump's queue is full; try again later")
        if failure is None:
            self.metrics.ingress(accepted=True)
        else:
            self.metrics.ingress(accepted=False)
            self._client_error(conversation, failure.code, failure.detail, listener.name)
            self._finish_one(conversation)
        return conversation.submission

    def reject(self, code: ErrorCode, detail: str) -> Submission:
        """Refuse a message the door could not even read (too large, too slow): the same SystemError and log line."""
        return self._refuse(Refusal(code, detail))

    def _assign_thread(
        self, sender: str, to: str, thread: str
    ) -> tuple[Conversation | None, str, list[RegisterThread]]:
        """Continue the sender's own live thread, or start a new conversation.

        Only this pump's conversations can be continued (their mailbox is
        here), so its own thread index is all it needs to look at.
        """
        known = self._threads.get(thread)
        if known is not None:
            conversation, chain = known
            if chain[-1] == sender and conversation.submission is not None:
                delivery_thread, registration = self._claim(conversation, (*chain, to))
                return conversation, delivery_thread, registration
        if len(self._conversations) >= self.limits.max_conversations:
            return None, thread, []
        conversation_id = new_thread_id()
        conversation = Conversation(conversation_id, sender, Submission(conversation_id, self.limits.mailbox_size))
        delivery_thread, registrations = self._open(conversation, to)
        return conversation, delivery_thread, registrations

    def _open(self, conversation: Conversation, target: str) -> tuple[str, list[RegisterThread]]:
        """Make ``conversation`` live: its root thread, and the thread its target is called on."""
        self._conversations[conversation.id] = conversation
        _, root = self._claim(conversation, (conversation.initiator,), conversation.id)
        thread, first = self._claim(conversation, (conversation.initiator, target))
        return thread, root + first

    def _claim(
        self, conversation: Conversation, chain: tuple[str, ...], thread: str | None = None
    ) -> tuple[str, list[RegisterThread]]:
        """The thread of ``chain`` in ``conversation``, and the registry write a new one needs."""
        existing = conversation.chains.get(chain)
        if existing is not None:
            return existing, []
        thread = thread or new_thread_id()
        conversation.chains[chain] = thread
        self._threads[thread] = (conversation, chain)
        return thread, [RegisterThread(chain_key(conversation.id, chain), thread)]

    def _extend(self, thread: str, target: str) -> tuple[str, list[RegisterThread]]:
        """The thread on which the head of ``thread``'s chain calls ``target``."""
        conversation, chain = self._threads[thread]
        return self._claim(conversation, (*chain, target))

    def _caller_of(self, thread: str) -> Pruned | None:
        """Where the head of ``thread``'s chain sends its response; None at the root."""
        known = self._threads.get(thread)
        if known is None or len(known[1]) < 2:
            return None
        conversation, chain = known
        parent = chain[:-1]
        return Pruned(target=parent[-1], thread_id=conversation.chains[parent])

    def _refuse(self, refusal: Refusal) -> Submission:
        """A client message that never became part of a conversation: answer it directly."""
        submission = Submission(refusal.thread or new_thread_id(), self.limits.mailbox_size)
        submission.deliver(
            self._error_reply(refusal.code, refusal.detail, to=refusal.sender, thread=submission.thread_id)
        )
        submission.close()
        self.metrics.ingress(accepted=False)
        self._note_error(
            refusal.code,
            refusal.detail,
            listener=refusal.target,
            thread=submission.thread_id,
            sender=refusal.sender,
            conversation=submission.thread_id,
        )
        return submission

    # ------------------------------------------------------------------ handling
    async def _handle(self, delivery: _Delivery) -> None:
        conversation, name = delivery.conversation, delivery.listener.name
        try:
            assert self._slots is not None
            self.metrics.message_in(name)
            try:
                outcome = await self._invoke(delivery)
            finally:
                if not delivery.listener.coordinator:
                    self._slots.release()
            self.observe.handled(outcome)
            if isinstance(outcome, Failure):
                self._note_error(
                    outcome.code,
                    outcome.detail,
                    listener=name,
                    thread=delivery.thread,
                    sender=delivery.sender,
                    conversation=conversation.id,
                )
                await self._climb(conversation, delivery.thread, outcome, name)
            else:
                await self._route(delivery, outcome)
        except asyncio.CancelledError:
            self._client_error(conversation, ErrorCode.SHUTTING_DOWN, f"{name} was stopped at shutdown", name)
            raise
        except BackendUnavailable as exc:
            self._client_error(
                conversation, ErrorCode.BACKEND_UNAVAILABLE, f"routing {name}'s result failed: {exc}", name
            )
        except Exception:  # a bug in the pump itself: report it, never let it vanish
            log.exception("internal error listener=%s thread=%s", name, delivery.thread)
            self._client_error(
                conversation, ErrorCode.INTERNAL, "internal error in the pump; the daemon log has details", name
            )
        finally:
            self._finish_one(conversation)

    async def _invoke(self, delivery: _Delivery) -> Any:
        """Run the handler under its listener's limits; a Failure if it did not finish well."""
        listener = delivery.listener
        try:
            if listener.slots.locked():  # only a wait needs a deadline; a free slot is taken at once
                async with asyncio.timeout(self.limits.enqueue_timeout_seconds):
                    await listener.slots.acquire()
            else:
                await listener.slots.acquire()
        except TimeoutError:
            waited = self.limits.enqueue_timeout_seconds
            return Failure(ErrorCode.OVERLOAD, f"{listener.name} stayed saturated for {waited:g}s")
        try:
            metadata = HandlerMetadata(
                thread_id=delivery.thread,
                from_id=delivery.sender,
                own_name=listener.name,
                conversation_id=delivery.conversation.id,
                is_self_call=delivery.sender == listener.name,
            )
            self._running += 1
            self.observe.handling(delivery.hop, delivery.conversation.id, listener.name)
            started = time.perf_counter()
            try:
                if listener.cpu_bound:
                    task = Task(
                        handler_path=listener.handler_path,
                        payload_type=payload_type_name(type(delivery.payload)),
                        payload_xml=delivery.payload_xml,
                        metadata=metadata,
                        timeout=listener.timeout_seconds,
                        traceparent=self.observe.traceparent(),
                    )
                    return await call_in_worker(self._process_pool(), listener, task, self._xml_limits)
                return await call_in_process(listener, delivery.payload, metadata)
            finally:
                self._running -= 1
                self.metrics.handler_finished(listener.name, time.perf_counter() - started)
        finally:
            listener.slots.release()

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

    # ------------------------------------------------------------------ routing
    async def _route(self, delivery: _Delivery, result: Any) -> None:
        if result is None:
            return
        name = delivery.listener.name
        failure = await self._deliver_result(delivery, result)
        if failure is None:
            self.metrics.message_out(name)
        else:
            await self._report_output_error(delivery.conversation, delivery.thread, failure, name)

    async def _deliver_result(self, delivery: _Delivery, result: Any) -> Failure | None:
        """Send what a handler returned where it asked; the failure if it cannot go."""
        listener, conversation = delivery.listener, delivery.conversation
        if not isinstance(result, HandlerResponse):
            kind = type(result).__name__
            return Failure(
                ErrorCode.BAD_RESPONSE, f"{listener.name} returned {kind}; a handler returns HandlerResponse or None"
            )
        if result.to is not None:
            target = self._listeners.get(result.to)
            if target is None:
                return Failure(ErrorCode.UNKNOWN_TARGET, f"{listener.name} sent to {result.to!r}, which is no listener")
            if not listener.may_call(result.to):
                return Failure(ErrorCode.PEER_NOT_ALLOWED, f"{listener.name} may not send to {result.to!r}")
            return await self._send(conversation, target, result.payload, listener.name, None, delivery.thread)
        pruned = self._caller_of(delivery.thread)
        if pruned is None:
            log.warning(
                "response dropped: %s is the root of thread=%s and has no caller", listener.name, delivery.thread
            )
            return None
        caller = self._listeners.get(pruned.target)
        if caller is not None:
            return await self._send(
                conversation, caller, result.payload, listener.name, pruned.thread_id, delivery.thread
            )
        if pruned.target == conversation.initiator:
            return await self._to_client(conversation, listener.name, pruned.target, pruned.thread_id, result.payload)
        return Failure(ErrorCode.UNKNOWN_TARGET, f"{listener.name}'s caller {pruned.target!r} is no longer a listener")

    async def _send(
        self,
        conversation: Conversation,
        target: Listener,
        payload: Any,
        sender: str,
        thread: str | None,
        from_thread: str,
    ) -> Failure | None:
        """Queue a message from a listener (or the system) to ``target``.

        ``thread`` is the delivery thread for a response; ``None`` means a
        forward, whose thread extends ``from_thread`` once the payload is valid.
        """
        prepared = self._outputs.for_listener(target, payload, sender)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        registrations: list[RegisterThread] = []
        if thread is None:
            thread, registrations = self._extend(from_thread, target.name)
        failure = await self._record(conversation, sender, target.name, thread, fresh, payload_xml, registrations)
        if failure is not None:
            return failure
        return await self._enqueue(conversation, _Delivery(target, fresh, payload_xml, sender, thread, conversation))

    async def _enqueue(self, conversation: Conversation, delivery: _Delivery) -> Failure | None:
        """Queue an internal message, waiting for room (bounded); the failure if there is none."""
        assert self._queue is not None
        self._begin_one(conversation)
        delivery.hop = self.observe.hop(
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
        try:
            async with asyncio.timeout(self.limits.enqueue_timeout_seconds):
                await self._queue.put(delivery)
        except asyncio.CancelledError:
            self._finish_one(conversation)
            raise
        except TimeoutError:
            self._finish_one(conversation)
            waited = self.limits.enqueue_timeout_seconds
            return Failure(ErrorCode.OVERLOAD, f"the pump's queue stayed full for {waited:g}s")
        return None

    async def _to_client(
        self, conversation: Conversation, sender: str, to: str, thread: str, payload: Any
    ) -> Failure | None:
        """Deliver a message addressed to the conversation's client into its mailbox."""
        prepared = self._outputs.for_client(payload, sender, to)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        failure = await self._record(conversation, sender, to, thread, fresh, payload_xml)
        self.observe.hop(conversation.id, sender, to, thread, type(fresh), payload_xml)
        if failure is not None:
            log.warning("reply delivered unrecorded listener=%s thread=%s: %s", sender, thread, failure.detail)
        if conversation.submission is None:  # a listener started it and is gone (e.g. a finished buffer)
            log.info("late answer dropped: %s is no longer listening (thread=%s from=%s)", to, thread, sender)
            return None
        envelope = envelope_bytes(sender, to, thread, payload_xml)
        conversation.submission.deliver(Reply(sender=sender, to=to, thread=thread, payload=fresh, envelope=envelope))
        return None

    # ------------------------------------------------------------------ errors
    def _note_error(
        self,
        code: ErrorCode,
        detail: str,
        *,
        listener: str | None,
        thread: str,
        sender: str | None,
        conversation: str,
    ) -> None:
        """The one log line and the one count that every SystemError gets.

        ``conversation`` is the thread the client sees (its replies and errors
        arrive on it), so an operator can search the log for what a client
        reports; ``thread`` is the hop's own thread.
        """
        self.metrics.error(code)
        self.observe.error(conversation, code, detail, listener)
        log.warning(
            "message failed code=%s listener=%s conversation=%s thread=%s from=%s: %s",
            code.value,
            listener or "-",
            conversation,
            thread,
            sender or "-",
            detail,
        )

    async def _report_output_error(
        self, conversation: Conversation, thread: str, failure: Failure, listener: str
    ) -> None:
        """``listener`` (at the head of ``thread``'s chain) produced output that cannot go where it asked."""
        self._note_error(
            failure.code,
            failure.detail,
            listener=listener,
            thread=thread,
            sender=listener,
            conversation=conversation.id,
        )
        head = self._listeners.get(listener)
        if head is not None and head.accepts_errors:
            await self._error_to_listener(conversation, head, thread, failure, listener)
        else:
            await self._climb(conversation, thread, failure, listener)

    async def _climb(self, conversation: Conversation, thread: str, failure: Failure, listener: str) -> None:
        """Carry an error up ``thread``'s call chain to the nearest caller that can take it."""
        current = thread
        while (pruned := self._caller_of(current)) is not None:
            caller = self._listeners.get(pruned.target)
            if caller is not None and caller.accepts_errors:
                await self._error_to_listener(conversation, caller, pruned.thread_id, failure, listener)
                return
            if caller is None and pruned.target == conversation.initiator:
                await self._to_client(
                    conversation, SYSTEM_SENDER, pruned.target, pruned.thread_id, error_payload(failure, listener)
                )
                return
            current = pruned.thread_id
        log.error(
            "error had no caller to go to code=%s listener=%s conversation=%s thread=%s",
            failure.code.value,
            listener,
            conversation.id,
            thread,
        )

    async def _error_to_listener(
        self, conversation: Conversation, target: Listener, thread: str, failure: Failure, listener: str
    ) -> None:
        error = error_payload(failure, listener)
        problem = await self._send(conversation, target, error, SYSTEM_SENDER, thread, thread)
        if problem is not None:  # the error itself could not be delivered: tell the client instead
            detail = f"{failure.detail} (and it could not reach {target.name}: {problem.detail})"
            self._client_error(conversation, failure.code, detail, listener)

    def _client_error(self, conversation: Conversation, code: ErrorCode, detail: str, listener: str) -> None:
        """Straight into the client's mailbox; never awaits, so it works while cancelling."""
        self._note_error(
            code, detail, listener=listener, thread=conversation.id, sender=None, conversation=conversation.id
        )
        if conversation.submission is None:
            return  # started by a listener: the log line is all there is to tell
        reply = self._error_reply(code, detail, to=conversation.initiator, thread=conversation.id, listener=listener)
        conversation.submission.deliver(reply)

    def _error_reply(self, code: ErrorCode, detail: str, *, to: str | None, thread: str, listener: str = "") -> Reply:
        payload = error_payload(Failure(code, detail), listener)
        element = codec_for(SystemErrorPayload).to_element(payload)
        envelope = envelope_bytes(SYSTEM_SENDER, to, thread, etree.tostring(element))
        return Reply(sender=SYSTEM_SENDER, to=to or "", thread=thread, payload=payload, envelope=envelope)

    def _abandon(self, delivery: _Delivery) -> None:
        """A queued message that will never be handled (shutdown): report it and count it done."""
        name = delivery.listener.name
        detail = f"the daemon stopped before {name} could handle this message"
        self._client_error(delivery.conversation, ErrorCode.SHUTTING_DOWN, detail, name)
        self._finish_one(delivery.conversation)

    # ------------------------------------------------------------------ bookkeeping
    async def _record(
        self,
        conversation: Conversation,
        sender: str,
        to: str,
        thread: str,
        payload: Any,
        payload_xml: bytes,
        registrations: list[RegisterThread] | None = None,
    ) -> Failure | None:
        """Write the hop to history (and any new thread to the registry): one batched call."""
        ops: list[StateOp] = list(registrations or ())
        ops.append(
            self.buffer.append_op(
                conversation.id,
                from_id=sender,
                to_id=to,
                hop_thread=thread,
                payload_type=payload_type_name(type(payload)),
                payload_xml=payload_xml,
            )
        )
        try:
            outcomes = await self.state.run(ops)
        except BackendUnavailable as exc:
            self._unclaim(op.uuid for op in registrations or ())
            return Failure(ErrorCode.BACKEND_UNAVAILABLE, str(exc))
        refused = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        if not refused:
            return None
        self._unclaim(
            op.uuid
            for op, outcome in zip(ops, outcomes, strict=True)
            if isinstance(op, RegisterThread) and isinstance(outcome, Exception)
        )
        return self._refused_write(refused[0])

    def _unclaim(self, threads: Iterable[str]) -> None:
        """Forget threads whose registration failed, so that a retry registers them again."""
        for thread in threads:
            known = self._threads.pop(thread, None)
            if known is not None:
                known[0].chains.pop(known[1], None)

    def _refused_write(self, refused: Exception) -> Failure:
        if isinstance(refused, BufferFull):
            limit = self.limits.max_slots_per_thread
            return Failure(ErrorCode.HISTORY_FULL, f"the conversation reached its limit of {limit} messages")
        if isinstance(refused, TooManyThreads):
            return Failure(ErrorCode.OVERLOAD, "too many conversations are open; try again later")
        return Failure(ErrorCode.BACKEND_UNAVAILABLE, str(refused))

    def _begin_one(self, conversation: Conversation) -> None:
        """Count a message that is about to be queued; paired with :meth:`_finish_one`."""
        conversation.pending += 1
        self._pending_total += 1
        if self._idle is not None:
            self._idle.clear()

    def _finish_one(self, conversation: Conversation) -> None:
        conversation.pending -= 1
        self._pending_total -= 1
        if conversation.pending == 0:
            self._end(conversation)
        if self._pending_total == 0 and self._idle is not None:
            self._idle.set()

    def _end(self, conversation: Conversation) -> None:
        """Nothing of the conversation is queued or running: forget its threads and history."""
        self.observe.ended(conversation.id)
        if self._on_conversation_end is not None:
            try:
                self._on_conversation_end(conversation.id, self.buffer.get_thread(conversation.id))
            except Exception:
                log.exception("on_conversation_end hook failed conversation=%s", conversation.id)
        forget: list[StateOp] = [ForgetThread(thread) for thread in conversation.chains.values()]
        for thread in conversation.chains.values():
            self._threads.pop(thread, None)
        self._conversations.pop(conversation.id, None)
        self.state.run_later([*forget, DeleteHistory(conversation.id)], then=lambda: self._ended(conversation))

    def _ended(self, conversation: Conversation) -> None:
        """The conversation's state is gone: now its client and its starter may hear that it is over."""
        if conversation.submission is not None:
            conversation.submission.close()
        if conversation.on_end is not None:
            try:
                conversation.on_end()
            except Exception:
                log.exception("on_end hook failed conversation=%s", conversation.id)
