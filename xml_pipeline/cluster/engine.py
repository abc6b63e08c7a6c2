"""The durable engine: one daemon's share of an organism whose hops live in Redis Streams.

Each daemon is one consumer of the organism's consumer group. Its tasks:

- **consume**: read new hops for the listeners it serves, no more than it can
  start now (each listener's ``max_concurrency``, the pump's ``max_in_flight``),
  so nothing it holds waits unseen;
- **handle**: decode, call the handler (here or in the process pool), route
  the result (:mod:`.routing`) and commit it with the acknowledgement in one
  script (:mod:`.store`);
- **lease and reclaim**: every ``lease_seconds`` it renews the hops it holds
  (so a long handler or a long wait in the pool's line is never mistaken for a
  dead daemon) and claims hops that another consumer has held without renewal
  for longer than their listener's ``timeout_seconds`` plus
  ``claim_grace_seconds``. A hop delivered ``max_deliveries`` times without
  being committed goes to the dead-letter stream, and its sender is told;
- **heartbeat**: a key with a TTL that ``status`` lists.

Handlers therefore run at least once per hop: a daemon that dies after a
handler ran but before its commit leaves the hop to be handled again, with
``metadata.delivery_attempt`` one higher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lxml import etree
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from xml_pipeline.background import run_guarded
from xml_pipeline.cancelling import raise_if_cancelling
from xml_pipeline.cluster.calls import DurableCaller
from xml_pipeline.cluster.decoded import DecodedPayloads
from xml_pipeline.cluster.hop import Hop
from xml_pipeline.cluster.opened_here import OpenedHere
from xml_pipeline.cluster.replies import Entry, ReplyWatcher, handed, was_handed
from xml_pipeline.cluster.routing import SYSTEM_SENDER, Router
from xml_pipeline.cluster.store import (
    NO_REPLIES,
    BacklogFull,
    ClientReply,
    ClusterStore,
    Committed,
    Effects,
    NotLive,
    StillLive,
)
from xml_pipeline.handler import Handler, HandlerMetadata
from xml_pipeline.memory.context_buffer import ContextBuffer, set_context_buffer
from xml_pipeline.memory.factory import spec_of
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.store_watch import StoreState, StoreWatch
from xml_pipeline.message.envelope import THREAD_ID, envelope_bytes
from xml_pipeline.message.payload_codec import PayloadDecodeError, codec_for
from xml_pipeline.message.safe_xml import XmlRejected, parse_checked
from xml_pipeline.message.system_payloads import ErrorCode, SystemErrorPayload
from xml_pipeline.message_bus.admission import Admitted, admit
from xml_pipeline.message_bus.client_access import IN_PROCESS, ClientAccess
from xml_pipeline.message_bus.deadlines import Deadlines
from xml_pipeline.message_bus.engine import Accepted, Refused
from xml_pipeline.message_bus.invocation import call_in_worker, call_watched
from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.message_bus.outcome import Failure, Refusal, error_payload
from xml_pipeline.message_bus.outputs import OutputPreparer
from xml_pipeline.message_bus.pump import PumpStats, ShutdownReport
from xml_pipeline.message_bus.slots import Slots
from xml_pipeline.message_bus.thread_registry import ThreadRegistry, new_thread_id, set_registry
from xml_pipeline.observe.events import Observation
from xml_pipeline.organism import Listener, Organism, register_generic
from xml_pipeline.process_pool.pool import CpuPool
from xml_pipeline.process_pool.worker import Task

log = logging.getLogger("xml_pipeline.cluster")

BLOCK_SECONDS = 0.5
"""How long one read waits for new hops or replies before looking around again."""
KEEP_HANDED_ATTEMPTS = 4
KEEP_HANDED_PAUSE_SECONDS = 0.5
"""Storing the replies of an end whose waiter was gone is tried this many times, pausing this much longer each
time (on top of the client's own retries of a lost connection): 3 seconds of pauses in all."""


@dataclass(frozen=True, slots=True)
class DurableSettings:
    max_deliveries: int = 3
    claim_grace_seconds: float = 5.0
    lease_seconds: float = 1.0
    heartbeat_seconds: float = 2.0
    reply_retention_seconds: float = 300.0
    forget_consumers_after_seconds: float = 600.0
    """A consumer (a daemon, alive or gone) holding nothing and idle this long leaves the group."""
    serve: frozenset[str] | None = None
    """The listeners this daemon handles (``run --listeners``); None: all of them."""

    @classmethod
    def from_settings(
        cls, backend: Mapping[str, Any], organism: Mapping[str, Any], serve: frozenset[str] | None
    ) -> DurableSettings:
        return cls(
            max_deliveries=int(backend.get("max_deliveries", 3)),
            claim_grace_seconds=float(backend.get("claim_grace_seconds", 5.0)),
            reply_retention_seconds=float(organism.get("reply_retention_seconds", 300.0)),
            serve=serve,
        )


@dataclass(slots=True)
class Collected:
    replies: list[ClientReply] = field(default_factory=list)
    ended: bool = False


class _MaybeStored(Exception):
    """Storing a client's message timed out: Redis may have run it, as part of ``conversation``."""

    def __init__(self, conversation: str) -> None:
        super().__init__(conversation)
        self.conversation = conversation


@dataclass(slots=True)
class _Held:
    """A hop this daemon has taken from its stream and not yet committed."""

    task: asyncio.Task[None] | None = None


class DurableEngine:
    def __init__(
        self,
        organism: Organism,
        backend: RedisBackend,
        settings: DurableSettings,
        *,
        metrics: PumpMetrics | None = None,
        daemon_id: str | None = None,
        collect_grace_seconds: float = 5.0,
    ) -> None:
        self.organism = organism
        self.limits = organism.limits
        self.metrics = metrics if metrics is not None else PumpMetrics()
        self.observe = Observation()
        self.settings = settings
        self.backend = backend
        self.daemon_id = daemon_id or f"{socket.gethostname()}-{os.getpid()}-{new_thread_id()[:8]}"
        self.store = ClusterStore(
            backend.spec.url,
            backend.prefix,
            socket_timeout=backend.socket_timeout + 2 * BLOCK_SECONDS,
            reply_retention=settings.reply_retention_seconds,
            daemon_id=self.daemon_id,
        )
        self._opened_here = OpenedHere(settings.reply_retention_seconds)
        self._storing: dict[str, int] = {}
        """Conversations whose client message this daemon is storing (noted as opened here once stored): a
        reply committed before the store's answer is read is news for a wait here all the same."""
        self.registry = ThreadRegistry(backend)
        self.buffer = ContextBuffer(
            backend, max_slots_per_thread=self.limits.max_slots_per_thread, max_threads=self.limits.max_conversations
        )
        self.store_watch = StoreWatch(backend)
        self._xml_limits = organism.limits.xml_limits()
        self._listeners: dict[str, Listener] = dict(organism.listeners)
        self._replies = ReplyWatcher(self.store)
        self.store.awaited_to_end = self._replies.awaited_to_end
        self._outputs = OutputPreparer(self._xml_limits)
        self._router = Router(lambda: self._listeners, self._outputs, self.buffer, self._note_error, self.observe)
        self._held: dict[str, dict[bytes, _Held]] = {name: {} for name in self._listeners}
        self.collect_grace_seconds = collect_grace_seconds
        self._collecting = 0
        """Client collects in progress, which stopping lets finish (up to the grace)."""
        self._collect_done = asyncio.Event()
        self._decoded = DecodedPayloads(capacity=max(1024, 2 * self.limits.max_in_flight))
        self._slots: dict[str, Slots] = {}
        self._deadlines = Deadlines()
        self._freed = asyncio.Event()
        self._consuming = False
        self._accepting = False
        self._runner: asyncio.Task[None] | None = None
        self._handlers: asyncio.TaskGroup | None = None
        self._pool: CpuPool | None = None
        self.redeliveries = 0
        self.dead_letters = 0
        self._consumers_checked = time.monotonic()
        self.started_at: float | None = None

    # ------------------------------------------------------------------ what the daemon sees
    @property
    def listeners(self) -> dict[str, Listener]:
        return self._listeners

    @property
    def pool(self) -> CpuPool | None:
        return self._pool

    @property
    def served(self) -> list[str]:
        serve = self.settings.serve
        return [name for name in self._listeners if serve is None or name in serve]

    @property
    def healthy(self) -> bool:
        runs = self._runner is not None and not self._runner.done()
        return runs and self.store_watch.health.state is not StoreState.LOST

    def stats(self) -> PumpStats:
        held = sum(len(entries) for entries in self._held.values())
        return PumpStats(
            listeners=len(self._listeners),
            queue_depth=0,
            in_flight=held,
            conversations=0,
            threads=0,
            accepting=self._accepting,
        )

    # ------------------------------------------------------------------ hosting the primitives
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
        self._held.setdefault(name, {})
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

    def caller(self, kind: str, run_id: str, *, concurrency: int) -> DurableCaller:
        return DurableCaller(self, kind, run_id)

    def run_background(self, work: Coroutine[Any, Any, object], name: str) -> None:
        """Run ``work`` with the engine's handlers: it ends with the daemon, and its errors are logged."""
        if self._handlers is None:
            work.close()
            raise RuntimeError("the durable engine is not running")
        run_guarded(self._handlers, work, name, log)

    async def open_internal(self, initiator: str, target_name: str, payload: Any) -> str | Failure:
        """Open a conversation from ``initiator`` (a primitive's run) to ``target_name``; its id, or why not."""
        target = self._listeners.get(target_name)
        if target is None:
            return Failure(ErrorCode.UNKNOWN_TARGET, f"no listener is named {target_name!r}")
        prepared = self._outputs.for_listener(target, payload, initiator)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        hop, effects = self._router.opening(initiator, target, fresh, payload_xml)
        self._keep_decoded(effects)
        try:
            await self._store_opened(hop.conversation, effects, None, opening=(initiator, target.name, -1))
        except (RedisError, OSError) as exc:
            return Failure(ErrorCode.BACKEND_UNAVAILABLE, f"redis is unreachable: {exc}")
        return hop.conversation

    def reload(self, organism: Organism) -> None:
        builtin = {name: listener for name, listener in self._listeners.items() if name.startswith("system.")}
        self._listeners = {**organism.listeners, **builtin}
        for name in self._listeners:
            self._held.setdefault(name, {})
        self.organism = organism

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        set_registry(self.registry)
        set_context_buffer(self.buffer)
        if "system.sequence" not in self._listeners:
            from xml_pipeline.primitives import install_primitives  # the primitives are built on an engine

            install_primitives(self)
        await self.store.ensure_groups(list(self._listeners))
        self._replies.inbox_opened(await self.store.open_inbox(self._heartbeat_ttl))
        if any(listener.cpu_bound for listener in self._listeners.values()):
            await self._process_pool().warm_up()
        self._consuming = True
        self._accepting = True
        self._runner = asyncio.create_task(self._run(), name="xml-pipeline-durable")
        self.started_at = time.monotonic()
        log.info(
            "durable engine started organism=%s daemon=%s serving=%s",
            self.organism.name,
            self.daemon_id,
            ",".join(self.served),
        )

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._handlers = group
            group.create_task(self._consume(group), name="xml-pipeline-consume")
            group.create_task(
                self._every(self.settings.lease_seconds, self._lease_and_reclaim), name="xml-pipeline-reclaim"
            )
            group.create_task(
                self._every(self.settings.heartbeat_seconds, self._heartbeat), name="xml-pipeline-heartbeat"
            )
            group.create_task(self.store_watch.run(), name="xml-pipeline-store-watch")
            group.create_task(self._replies.run(), name="xml-pipeline-replies")

    async def stop(self, drain_timeout: float = 10.0) -> ShutdownReport:
        """Stop taking hops, let those held finish for ``drain_timeout``, then leave the rest pending.

        Nothing is lost: a hop cut short was never acknowledged, so a live
        daemon (or this one, restarted) claims it and handles it again.
        """
        self._accepting = False
        self._consuming = False
        drained = True
        try:
            async with asyncio.timeout(drain_timeout):
                while any(self._held.values()):
                    self._freed.clear()
                    await self._freed.wait()
        except TimeoutError:
            drained = False
        cut_short = sum(len(entries) for entries in self._held.values())
        await self._let_clients_collect()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._pool is not None:
            await self._pool.close(kill=not drained)
            self._pool = None
        await self.store_watch.close()
        await self._replies.close()
        with contextlib.suppress(RedisError):
            await self.store.forget_daemon(self.daemon_id)
        await self.store.close()
        if cut_short:
            log.warning("stopping: %d hop(s) left pending; a live daemon will handle them again", cut_short)
        log.info("durable engine stopped daemon=%s drained=%s", self.daemon_id, drained)
        return ShutdownReport(drained=drained, cancelled=cut_short)

    async def _let_clients_collect(self) -> None:
        """Clients waiting here for replies get them for up to ``collect_grace_seconds`` (the hops may be
        handled by other daemons meanwhile); then each wait ends with what it has, before Redis is let go."""
        try:
            async with asyncio.timeout(self.collect_grace_seconds):
                while self._collecting:
                    self._collect_done.clear()
                    await self._collect_done.wait()
        except TimeoutError:
            log.warning(
                "stopping: %d client(s) still waiting for replies; they can collect them from another daemon",
                self._collecting,
            )
        self._replies.stop_waiting()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BLOCK_SECONDS * 2):  # each released wait answers with what it has
                while self._collecting:
                    self._collect_done.clear()
                    await self._collect_done.wait()

    async def _every(self, interval: float, work: Any) -> None:
        while True:
            try:
                await work()
            except (RedisError, OSError) as exc:
                raise_if_cancelling()
                log.warning("%s failed, trying again in %gs: %s", work.__name__, interval, exc)
            raise_if_cancelling()  # a cancellation the library took in without a word
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ the door
    async def accept(self, raw: bytes, *, access: ClientAccess = IN_PROCESS) -> Accepted | Refused:
        """Store a client's message durably: Accepted means it is in Redis and will be handled."""
        if not self._accepting:
            return self._refused(Refusal(ErrorCode.SHUTTING_DOWN, "the daemon is not accepting messages"))
        try:
            admitted = admit(raw, self._listeners, self._xml_limits, access)
        except Exception as exc:
            log.exception("internal error while admitting a message")
            admitted = Refusal(ErrorCode.INTERNAL, f"the message could not be checked: {type(exc).__name__}")
        if isinstance(admitted, Refusal):
            return self._refused(admitted)
        sender, target = admitted.envelope.sender, admitted.listener
        try:
            hop = await self._store_client_message(admitted, access)
        except _MaybeStored as uncertain:  # Redis may have run it: tell the client where its replies would be
            conversation = uncertain.conversation
            detail = (
                f"redis did not answer in time ({uncertain.__cause__}); the message may have been stored: collect"
                f" its replies on thread {conversation} before sending it again, which could run it twice"
            )
            return self._refused(Refusal(ErrorCode.BACKEND_UNCERTAIN, detail, sender, conversation, target.name))
        except BacklogFull as exc:
            return self._refused(
                Refusal(ErrorCode.OVERLOAD, f"{exc}; try again later", sender, admitted.envelope.thread, target.name)
            )
        except (RedisError, OSError) as exc:
            return self._refused(
                Refusal(
                    ErrorCode.BACKEND_UNAVAILABLE,
                    f"redis is unreachable: {exc}",
                    sender,
                    admitted.envelope.thread,
                    target.name,
                )
            )
        self.metrics.ingress(accepted=True)
        return Accepted(hop.conversation)

    async def _store_client_message(self, admitted: Admitted, access: ClientAccess) -> Hop:
        """Store a client's message as the next hop of its live conversation, or as a new one's first.

        As on one daemon, a client continues a conversation by sending on its
        thread while the conversation lives, and only the client that opened
        it can (with tokens, ``from`` is the identity, and a client without one
        cannot continue a conversation opened with one, nor the reverse). Any
        other thread opens a new conversation. A conversation that ends between
        the opening's look and the continuation is not continued: the message opens a new one.
        """
        sender, target = admitted.envelope.sender, admitted.listener
        cap = (sender, target.name, self.limits.queue_size)
        thread = admitted.envelope.thread
        hop, effects = self._router.opening(sender, target, admitted.payload, admitted.payload_xml)
        self._keep_decoded(effects)
        # The opening itself asks whether the thread is the client's live conversation: one call, not a look
        # before every opening. Only then is the message stored as a continuation instead.
        unless_live = thread if THREAD_ID.match(thread) else ""
        try:
            return await self._open(hop, effects, cap, access, unless_live)
        except StillLive:
            pass
        continued = await self._continue(admitted, access, cap)
        if continued is not None:
            return continued
        return await self._open(hop, effects, cap, access, "")  # it ended meanwhile: a new conversation after all

    async def _open(
        self, hop: Hop, effects: Effects, cap: tuple[str, str, int], access: ClientAccess, unless_live: str
    ) -> Hop:
        try:
            await self._store_opened(hop.conversation, effects, access.identity, opening=cap, unless_live=unless_live)
        except RedisTimeoutError as exc:
            raise _MaybeStored(hop.conversation) from exc
        return hop

    async def _continue(self, admitted: Admitted, access: ClientAccess, cap: tuple[str, str, int]) -> Hop | None:
        """Store a client's message as the next hop of its live conversation; None if that has ended since."""
        sender, target, thread = admitted.envelope.sender, admitted.listener, admitted.envelope.thread
        hop, effects = self._router.continuing(sender, target, thread, admitted.payload, admitted.payload_xml)
        self._keep_decoded(effects)
        try:
            await self._store_opened(thread, effects, access.identity, opening=cap, continues=hop.thread)
        except NotLive:
            return None
        except RedisTimeoutError as exc:
            raise _MaybeStored(thread) from exc
        return hop

    async def _store_opened(self, conversation: str, effects: Effects, owner: str | None, **options: Any) -> None:
        """Commit a message this daemon stores for its client (or a primitive's run), and remember the
        conversation as opened here once stored (its owner matched): its replies are awaited here."""
        with _Storing(self._storing, conversation):
            await self.store.commit(conversation, effects, owner=owner, **options)
            self._opened_here.note(conversation, owner)

    def refuse(self, code: ErrorCode, detail: str) -> Refused:
        """Refuse a message the door could not even read (too large, too slow): the same SystemError and log line."""
        return self._refused(Refusal(code, detail))

    def _refused(self, refusal: Refusal) -> Refused:
        thread = refusal.thread or new_thread_id()
        self.metrics.ingress(accepted=False)
        self.metrics.error(refusal.code)
        log.warning(
            "message failed code=%s listener=%s conversation=%s thread=%s from=%s: %s",
            refusal.code.value,
            refusal.target or "-",
            thread,
            thread,
            refusal.sender or "-",
            refusal.detail,
        )
        payload = error_payload(Failure(refusal.code, refusal.detail), "")
        element = codec_for(SystemErrorPayload).to_element(payload)
        envelope = envelope_bytes(SYSTEM_SENDER, refusal.sender, thread, etree.tostring(element))
        return Refused(refusal.code, refusal.detail, thread, envelope)

    async def collect(
        self, conversation: str, mode: str, timeout: float, *, owner: str | None = None
    ) -> Collected | None:
        """The replies for ``conversation`` so far (``none``), the first, or all until it ends; None if unknown.

        Any daemon of the organism answers: replies live in Redis until
        collected, or ``reply_retention_seconds`` after the end.
        """
        self._collecting += 1
        try:
            return await self._collect(conversation, mode, timeout, owner)
        finally:
            self._collecting -= 1
            self._collect_done.set()

    async def _collect(self, conversation: str, mode: str, timeout: float, owner: str | None) -> Collected | None:
        remembered = self._opened_here.recall(conversation)
        home = remembered is not None
        if remembered is not None:
            opened_by, known = remembered.owner, True
        else:
            opened_by, known = await self.store.look(conversation)
        if not known or opened_by != owner:
            return None  # unknown at once; another client's (or one with an identity, asked without): as unknown
        collected = Collected()
        seen: list[bytes] = []
        after = b"0"
        deadline = time.monotonic() + timeout
        # Only a look needs its own read; a wait starts with the watcher's next read, which covers every
        # waiting conversation at once (and returns at once what is there already).
        entries = await self.store.replies(conversation, after) if mode == "none" or timeout <= 0 else []
        while True:
            for entry_id, reply in entries:
                after = entry_id
                seen.append(entry_id)
                if reply is None:
                    collected.ended = True
                else:
                    collected.replies.append(reply)
            remaining = deadline - time.monotonic()
            if collected.ended or mode == "none" or (mode == "first" and collected.replies) or remaining <= 0:
                break
            entries = await self._replies.wait(conversation, after, remaining, home=home, until_end=mode == "end")
            if not entries and self._replies.stopped:
                break  # the daemon is stopping: what came so far, and the rest from another daemon
        if not seen and not await self.store.conversation_known(conversation):
            return None
        if not (seen and was_handed(seen[-1])):  # handed over by a commit here: nothing was stored
            await self.store.forget_replies(conversation, seen, ended=collected.ended)
        if collected.ended:
            self._opened_here.forget(conversation)
        return collected

    # ------------------------------------------------------------------ consuming
    def _capacity(self) -> dict[str, int]:
        overall = self.limits.max_in_flight - sum(len(entries) for entries in self._held.values())
        if overall <= 0:
            return {}
        free = {}
        for name in self.served:
            listener = self._listeners[name]
            room = min(listener.max_concurrency - len(self._held[name]), overall)
            if room > 0:
                free[name] = room
        return free

    async def _consume(self, group: asyncio.TaskGroup) -> None:
        while self._consuming:
            counts = self._capacity()
            if not counts:
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BLOCK_SECONDS):
                        await self._freed.wait()
                continue
            try:
                found = await self.store.read(self.daemon_id, counts, int(BLOCK_SECONDS * 1000))
            except (RedisError, OSError) as exc:
                raise_if_cancelling()
                log.warning("reading hops failed, trying again: %s", exc)
                await asyncio.sleep(BLOCK_SECONDS)
                continue
            for listener, entry_id, hop in found:
                self._start(group, listener, entry_id, hop, attempt=1)

    def _start(self, group: asyncio.TaskGroup, listener: str, entry_id: bytes, hop: Hop, attempt: int) -> None:
        held = _Held()
        self._held.setdefault(listener, {})[entry_id] = held
        held.task = group.create_task(self._handle(listener, entry_id, hop, attempt))

    async def _handle(self, listener_name: str, entry_id: bytes, hop: Hop, attempt: int) -> None:
        try:
            effects = await self._outcome(listener_name, hop, attempt)
            self._keep_decoded(effects)
            committed = await self.store.commit(
                hop.conversation,
                effects,
                done=(self.store.keys.stream(listener_name), entry_id),
                hand_over=True,
            )
            await self._tell_waiters(hop.conversation, effects, committed)
            if committed.ended:
                self.observe.ended(hop.conversation)
            if effects.hops or effects.replies:
                self.metrics.message_out(listener_name)
        except (RedisError, OSError) as exc:
            log.warning(
                "hop of %s left pending (it will be handled again) thread=%s: %s", listener_name, hop.thread, exc
            )
        except Exception:
            log.exception("internal error listener=%s thread=%s; the hop stays pending", listener_name, hop.thread)
        finally:
            self._held.get(listener_name, {}).pop(entry_id, None)
            self._freed.set()

    async def _outcome(self, listener_name: str, hop: Hop, attempt: int) -> Effects:
        listener = self._listeners.get(listener_name)
        if listener is None:
            failure = Failure(ErrorCode.UNKNOWN_TARGET, f"no listener is named {listener_name!r} any more")
            return self._router.failure(hop, listener_name, failure)
        payload = self._decode(listener, hop)
        if isinstance(payload, Failure):
            return self._router.failure(hop, listener_name, payload)
        metadata = HandlerMetadata(
            thread_id=hop.thread,
            from_id=hop.sender,
            own_name=listener.name,
            conversation_id=hop.conversation,
            is_self_call=hop.sender == listener.name,
            delivery_attempt=attempt,
        )
        slots = self._slots.get(listener.name)
        if slots is None:
            slots = self._slots[listener.name] = Slots(listener.max_concurrency)
        await slots.take()
        try:
            self.metrics.message_in(listener.name)
            self.observe.handling(hop.trace, hop.conversation, listener.name)
            started = time.perf_counter()
            try:
                if listener.cpu_bound:
                    task = Task(
                        listener.handler_path,
                        hop.payload_type,
                        hop.payload_xml,
                        metadata,
                        listener.timeout_seconds,
                        self.observe.traceparent(),
                    )
                    result = await call_in_worker(self._process_pool(), listener, task, self._xml_limits)
                else:
                    # the handler's deadline on the one timer of every in-process call (its task is this one)
                    result = await call_watched(listener, payload, metadata, self._deadlines, _this_task())
            finally:
                self.metrics.handler_finished(listener.name, time.perf_counter() - started)
        finally:
            slots.release()
        self.observe.handled(result)
        return self._router.route(hop, listener, result)

    async def _tell_waiters(self, conversation: str, effects: Effects, committed: Committed) -> None:
        """Hand what a commit here wrote for the client to its waiters here, so they need not read it back."""
        if committed.handed:
            entries = _reply_entries(handed(max(1, len(effects.replies))), effects.replies, ended=True)
            if self._replies.hand_over(conversation, entries):
                return
            committed = await self._keep_handed(conversation, effects.replies, committed.owner)
        ids = committed.reply_ids
        if not ids:
            return
        entries = _reply_entries(ids, effects.replies, ended=committed.ended)
        whole = committed.fresh and len(ids) == max(1, len(effects.replies))
        # news nobody waits for yet is remembered only for a conversation opened here: any other's wait reads
        home = conversation in self._storing or self._opened_here.recall(conversation) is not None
        if self._replies.delivered(conversation, entries, whole=whole, home=home):
            await self._replies.nudge()

    async def _keep_handed(self, conversation: str, replies: list[ClientReply], owner: str) -> Committed:
        """The end a commit handed over found its waiter gone (it timed out, or its client left, meanwhile): store
        the replies after all, as the commit would have, for the client to collect. Until then the conversation
        reads as unknown; should Redis stay unreachable through every attempt, they are lost, and said so."""
        for attempt in range(1, KEEP_HANDED_ATTEMPTS + 1):
            try:
                return await self.store.keep_replies(conversation, replies, owner)
            except (RedisError, OSError) as exc:
                if attempt == KEEP_HANDED_ATTEMPTS:
                    log.error(
                        "the replies of ended conversation %s could not be stored for its client, whose wait ended"
                        " as the conversation did: %s",
                        conversation,
                        exc,
                    )
                else:
                    await asyncio.sleep(KEEP_HANDED_PAUSE_SECONDS * attempt)
        return NO_REPLIES

    def _keep_decoded(self, effects: Effects) -> None:
        """Keep the fresh payloads of hops this daemon may handle, for :meth:`_decode` (before the commit:
        the hop can be read back from its stream before the commit's caller runs again)."""
        serve = self.settings.serve
        for hop in effects.hops:
            if hop.decoded is not None and (serve is None or hop.target in serve):
                self._decoded.keep(hop.thread, hop.payload_xml, hop.decoded)

    def _decode(self, listener: Listener, hop: Hop) -> Any:
        """The hop's payload as ``listener``'s class: the one this daemon decoded when it made the hop, or
        decoded from the stored bytes and checked again, for Redis is not the sender's word."""
        kept = self._decoded.take(hop.thread, hop.payload_xml)
        if kept is not None and type(kept) in listener.codecs_by_class:
            return kept
        try:
            element = parse_checked(hop.payload_xml, self._xml_limits).root
        except XmlRejected as rejected:
            return Failure(rejected.code, rejected.detail)
        codec = listener.codecs_by_tag.get(element.tag)
        if codec is None and listener.accepts_errors and element.tag == codec_for(SystemErrorPayload).xml_name:
            codec = codec_for(SystemErrorPayload)
        if codec is None:
            return Failure(ErrorCode.PAYLOAD_INVALID, f"{listener.name!r} accepts {listener.accepted_names}")
        problem = codec.validate(element)
        if problem is not None:
            return Failure(ErrorCode.PAYLOAD_INVALID, f"<{codec.xml_name}>: {problem}")
        try:
            return codec.from_element(element)
        except PayloadDecodeError as exc:
            return Failure(ErrorCode.PAYLOAD_INVALID, str(exc))

    def _note_error(self, code: ErrorCode, detail: str, listener: str, hop: Hop) -> None:
        self.metrics.error(code)
        self.observe.error(hop.conversation, code, detail, listener)
        log.warning(
            "message failed code=%s listener=%s conversation=%s thread=%s from=%s: %s",
            code.value,
            listener,
            hop.conversation,
            hop.thread,
            hop.sender,
            detail,
        )

    # ------------------------------------------------------------------ leases, reclaiming, dead letters
    async def _lease_and_reclaim(self) -> None:
        assert self._handlers is not None
        await self._forget_gone_consumers()
        for name in self.served:
            held = self._held.get(name, {})
            await self.store.renew(name, self.daemon_id, list(held))
            if not self._consuming:
                continue
            room = self._capacity().get(name, 0)
            if room <= 0:
                continue
            min_idle_ms = int(self._claim_after(self._listeners[name]) * 1000)
            for entry in await self.store.pending(name, min_idle_ms, room):
                if entry.entry_id in held:
                    continue
                hop = await self.store.claim(name, self.daemon_id, min_idle_ms, entry.entry_id)
                if hop is None:
                    continue
                if entry.deliveries >= self.settings.max_deliveries:
                    await self._dead_letter(name, entry.entry_id, hop, entry.deliveries)
                    continue
                self.redeliveries += 1
                self.metrics.redelivered(name)
                log.warning(
                    "claimed a hop of %s from silent daemon %s (delivery %d) thread=%s",
                    name,
                    entry.consumer,
                    entry.deliveries + 1,
                    hop.thread,
                )
                self._start(self._handlers, name, entry.entry_id, hop, attempt=entry.deliveries + 1)

    async def _forget_gone_consumers(self) -> None:
        """Now and then, drop the group's consumers that hold nothing and said nothing for long: gone daemons."""
        after = self.settings.forget_consumers_after_seconds
        now = time.monotonic()
        if now - self._consumers_checked < min(after, 60.0):
            return
        self._consumers_checked = now
        for name in self.served:
            await self.store.forget_consumers(name, idle_ms=int(after * 1000), keep=self.daemon_id)

    def _claim_after(self, listener: Listener) -> float:
        """How long a hop must go unrenewed before it is taken from its daemon.

        A handler runs at most ``timeout_seconds``, even one that blocks its
        daemon's event loop and so stops its leases; past that plus the grace,
        the daemon is gone. Coordinators (the primitives' runs) are our own
        code and never block, so their leases alone tell: the grace suffices.
        """
        if listener.coordinator:
            return self.settings.claim_grace_seconds
        return listener.timeout_seconds + self.settings.claim_grace_seconds

    async def _dead_letter(self, listener: str, entry_id: bytes, hop: Hop, deliveries: int) -> None:
        failure = Failure(
            ErrorCode.DEAD_LETTER,
            f"{listener} did not finish this message in {deliveries} deliveries (each time its daemon stopped or"
            " died); it was moved to the dead-letter stream",
        )
        effects = self._router.failure(hop, listener, failure)
        letter = [*hop.fields(), "listener", listener, "deliveries", str(deliveries), "failed_at", str(time.time())]
        # Its conversation may end before an operator replays it, and its owner with it: the letter keeps it.
        owner, _ = await self.store.look(hop.conversation)
        if owner is not None:
            letter += ["owner", owner]
        effects.dead_letters.append(letter)
        committed = await self.store.commit(
            hop.conversation,
            effects,
            done=(self.store.keys.stream(listener), entry_id),
        )
        await self._tell_waiters(hop.conversation, effects, committed)
        if committed.ended:
            self.observe.ended(hop.conversation)
        self.dead_letters += 1
        self.metrics.dead_lettered(listener)

    async def _heartbeat(self) -> None:
        about = {
            "daemon": self.daemon_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "serving": self.served,
            "in_flight": sum(len(entries) for entries in self._held.values()),
            "redeliveries": self.redeliveries,
            "dead_letters": self.dead_letters,
        }
        if not await self.store.heartbeat(self.daemon_id, about, ttl_seconds=self._heartbeat_ttl):
            log.warning("this daemon's inbox had expired (Redis was unreachable or restarted empty); made again")
            self._replies.inbox_opened(await self.store.open_inbox(self._heartbeat_ttl))

    @property
    def _heartbeat_ttl(self) -> int:
        return max(3, int(3 * self.settings.heartbeat_seconds))

    async def dead_letter_rows(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The first ``count`` entries of the dead-letter stream, as Redis keeps them."""
        rows: Any = await self.store.client.xrange(self.store.keys.dead_letters, count=count)
        return list(rows)

    async def cluster_status(self) -> dict[str, Any]:
        """Every live daemon, and the backlog of every listener, as ``status`` shows them."""
        listeners = {}
        for name in self._listeners:
            waiting, handling = await self.store.backlog(name)
            listeners[name] = {"stored": waiting, "in_flight": handling}
        return {
            "daemon": self.daemon_id,
            "daemons": sorted(await self.store.daemons(), key=lambda d: str(d.get("daemon"))),
            "listeners": listeners,
            "dead_letters": await self.store.dead_letter_count(),
            "redeliveries": self.redeliveries,
        }

    # ------------------------------------------------------------------ pool
    def _process_pool(self) -> CpuPool:
        if self._pool is None:
            settings = self.organism.settings.get("process_pool", {})
            self._pool = CpuPool(
                workers=settings.get("workers"),
                max_tasks_per_child=settings.get("max_tasks_per_child"),
                backend_spec=spec_of(self.backend),
                max_slots_per_thread=self.limits.max_slots_per_thread,
                max_threads=self.limits.max_conversations,
            )
        return self._pool


def _this_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:  # a handler is always called from a task of the engine's group
        raise RuntimeError("a handler's call must run in a task")
    return task


class _Storing:
    """Counts ``conversation`` as being stored here while the block runs (a class: it is on the door's path, where a
    generator-based context manager cost more than the count itself)."""

    __slots__ = ("_conversation", "_counts")

    def __init__(self, counts: dict[str, int], conversation: str) -> None:
        self._counts = counts
        self._conversation = conversation

    def __enter__(self) -> None:
        self._counts[self._conversation] = self._counts.get(self._conversation, 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        left = self._counts.pop(self._conversation) - 1
        if left:
            self._counts[self._conversation] = left


def _reply_entries(ids: list[bytes], replies: list[ClientReply], *, ended: bool) -> list[Entry]:
    """A commit's replies as the entries a waiter takes: each with its id, then the end (on the last id)."""
    entries: list[Entry] = list(zip(ids, replies, strict=False))
    if ended:
        entries.append((ids[-1], None))
    return entries
