"""The batcher: the writes of one event-loop turn cross the network once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import pytest

from tests.redis_server import RedisServer, free_port
from tests.support import Ping, Pong, echo
from xml_pipeline import ErrorCode, HandlerMetadata, HandlerResponse
from xml_pipeline.memory import state_batcher
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import BackendUnavailable, BufferFull
from xml_pipeline.memory.state_batcher import StateBatcher
from xml_pipeline.memory.state_ops import AppendSlot, DeleteHistory, RegisterThread
from xml_pipeline.message_bus.thread_registry import get_registry
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.testing import running


class CountingBackend(InMemoryBackend):
    """The memory backend, claiming to be shared so that its writes are batched, and counting batches."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    @property
    def is_shared(self) -> bool:
        return True

    def apply(self, ops):  # type: ignore[no-untyped-def]
        self.batch_sizes.append(len(ops))
        return super().apply(ops)


async def test_concurrent_writers_share_one_round_trip_and_each_gets_its_own_outcomes() -> None:
    backend = CountingBackend()
    batcher = StateBatcher(backend)

    async def writer(n: int) -> list[object]:
        return await batcher.run([RegisterThread(f"c/{n}", f"u{n}"), AppendSlot("shared", f"<m{n}/>".encode(), 30, 5)])

    outcomes = await asyncio.gather(*(writer(n) for n in range(40)))
    assert backend.batch_sizes == [80]
    assert [outcome[1] for outcome in outcomes[:30]] == list(range(30))  # the order the writers made them
    assert all(isinstance(outcome[1], BufferFull) for outcome in outcomes[30:])
    assert backend.buffer_get_thread("shared") == [f"<m{n}/>".encode() for n in range(30)]


async def test_a_large_turn_goes_in_several_round_trips_without_splitting_a_writer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(state_batcher, "MAX_BATCH", 5)
    backend = CountingBackend()
    batcher = StateBatcher(backend)
    ops = [AppendSlot("t", b"<a/>", 100, 5), AppendSlot("t", b"<b/>", 100, 5)]
    outcomes = await asyncio.gather(*(batcher.run(ops) for _ in range(6)))
    assert backend.batch_sizes == [4, 4, 4]
    assert [outcome for pair in outcomes for outcome in pair] == list(range(12))


async def test_a_store_that_is_not_shared_is_written_at_once() -> None:
    backend = InMemoryBackend()
    batcher = StateBatcher(backend)
    ended: list[bool] = []
    assert await batcher.run([AppendSlot("t", b"<a/>", 10, 10)]) == [0]
    batcher.run_later([DeleteHistory("t")], then=lambda: ended.append(backend.buffer_thread_exists("t")))
    assert ended == [False]  # before run_later returned
    assert batcher.batches == 0


async def test_cleanup_runs_its_callback_only_after_the_writes() -> None:
    backend = CountingBackend()
    batcher = StateBatcher(backend)
    await batcher.run([AppendSlot("t", b"<a/>", 10, 10)])
    seen: list[bool] = []
    batcher.run_later([DeleteHistory("t")], then=lambda: seen.append(backend.buffer_thread_exists("t")))
    assert seen == []
    batcher.flush()
    assert seen == [False]


async def test_an_unreachable_store_fails_every_writer_of_the_batch(caplog: pytest.LogCaptureFixture) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", retries=0, socket_timeout=0.5)
    batcher = StateBatcher(backend)
    ended: list[str] = []
    batcher.run_later([DeleteHistory("gone")], then=lambda: ended.append("told"))
    with caplog.at_level(logging.WARNING, logger="xml_pipeline.state"):
        outcomes = await asyncio.gather(
            batcher.run([AppendSlot("a", b"<a/>", 10, 10)]),
            batcher.run([AppendSlot("b", b"<b/>", 10, 10)]),
            return_exceptions=True,
        )
    assert all(isinstance(outcome, BackendUnavailable) for outcome in outcomes)
    assert ended == ["told"]  # the cleanup's follower still runs; the keys are left to their TTL
    assert "left to expire" in caplog.text
    backend.close()


async def test_a_pump_on_redis_batches_its_writes_and_cleans_up_before_the_client_hears_the_end(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """...and sends them on its event loop: the loop never waits out a round trip while it runs."""
    backend = RedisBackend(redis_server.url, prefix=f"batch-{uuid.uuid4().hex[:8]}:")
    blocking: list[int] = []
    apply = RedisBackend.apply
    monkeypatch.setattr(RedisBackend, "apply", lambda self, ops: blocking.append(len(ops)) or apply(self, ops))
    organism = Organism.of("batching", [Listener("echo", [Ping], echo, max_concurrency=100)])
    async with running(organism, backend=backend) as pump:
        submissions = await asyncio.gather(*(pump.inject_payload(Ping(f"n{n}"), "echo") for n in range(50)))
        replies = await asyncio.gather(*(submission.collect(10) for submission in submissions))
        assert [reply.payload.text for (reply,) in replies] == [f"n{n}" for n in range(50)]
        stored = backend.keys()
        assert [key for key in stored if ":reg:" in key or ":buf" in key] == []
        assert pump.state.ops_sent == 50 * 7  # two threads, two slots, forgotten: every write was made
        assert pump.state.batches <= 50  # ...in far fewer round trips than the 150 unbatched calls
        assert blocking == []
    backend.close()


class FlakyBackend(InMemoryBackend):
    """The memory backend, unreachable while ``down`` is set."""

    down = False

    def apply(self, ops):  # type: ignore[no-untyped-def]
        if self.down:
            raise BackendUnavailable("the store is down (on purpose)")
        return super().apply(ops)


async def who_am_i(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Answers with what the shared registry says its thread is."""
    return HandlerResponse.respond(Pong(str(get_registry().lookup(metadata.thread_id))))


async def test_a_thread_whose_registration_failed_is_registered_when_the_client_retries() -> None:
    release = asyncio.Event()

    async def holds(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        await asyncio.wait_for(release.wait(), 10)  # keeps the conversation open
        return HandlerResponse.respond(Pong("held"))

    backend = FlakyBackend()
    organism = Organism.of("retry", [Listener("holder", [Ping], holds), Listener("who", [Ping], who_am_i)])
    async with running(organism, backend=backend) as pump:
        conversation = await pump.inject_payload(Ping("open"), "holder")
        backend.down = True
        await pump.inject_payload(Ping("first try"), "who", thread=conversation.thread_id)
        assert (await conversation.next_reply(5)).error_code is ErrorCode.BACKEND_UNAVAILABLE
        backend.down = False
        await pump.inject_payload(Ping("retry"), "who", thread=conversation.thread_id)
        assert (await conversation.next_reply(5)).payload.text == "console.who"  # registered, for handlers to see
        release.set()
        assert (await conversation.next_reply(5)).payload.text == "held"


class HeldWriter:
    """An event-loop writer whose batches wait until the test lets each one through."""

    def __init__(self, backend: OverlappingBackend) -> None:
        self.backend = backend
        self.arrived: asyncio.Queue[tuple[list[object], asyncio.Event]] = asyncio.Queue()

    async def apply(self, ops):  # type: ignore[no-untyped-def]
        through = asyncio.Event()
        await self.arrived.put((list(ops), through))
        await through.wait()
        return InMemoryBackend.apply(self.backend, ops)

    async def next_batch(self) -> tuple[list[object], asyncio.Event]:
        async with asyncio.timeout(5):
            return await self.arrived.get()


class OverlappingBackend(CountingBackend):
    """Shared, with an event-loop writer: the batcher's sender writes through it."""

    def __init__(self) -> None:
        super().__init__()
        self.held = HeldWriter(self)

    @contextlib.asynccontextmanager
    async def writer(self):  # type: ignore[no-untyped-def]
        yield self.held


async def test_with_an_event_loop_writer_one_batch_travels_while_the_next_gathers_and_order_is_kept() -> None:
    backend = OverlappingBackend()
    batcher = StateBatcher(backend)
    assert batcher.overlaps
    async with asyncio.TaskGroup() as group:
        sender = group.create_task(batcher.send_continuously())
        first = group.create_task(batcher.run([AppendSlot("t", b"<one/>", None, None)]))
        ops, through = await backend.held.next_batch()
        assert ops == [AppendSlot("t", b"<one/>", None, None)]
        # the loop is free while the batch travels: more writes come, and wait for the next batch
        second = group.create_task(batcher.run([AppendSlot("t", b"<two/>", None, None)]))
        third = group.create_task(batcher.run([AppendSlot("t", b"<three/>", None, None)]))
        await asyncio.sleep(0)
        assert backend.held.arrived.empty()  # one batch at a time
        through.set()
        assert await first == [0]
        ops, through = await backend.held.next_batch()
        assert [op.slot for op in ops] == [b"<two/>", b"<three/>"]  # type: ignore[attr-defined]
        through.set()
        assert [await second, await third] == [[1], [2]]
        sender.cancel()
    assert backend.buffer_get_thread("t") == [b"<one/>", b"<two/>", b"<three/>"]


async def test_a_sender_stopped_with_a_batch_on_its_way_finishes_it_and_writes_what_came_meanwhile() -> None:
    """A pump that stops leaves no state writes behind, and every caller hears how its writes went."""
    backend = OverlappingBackend()
    batcher = StateBatcher(backend)
    cleaned: list[str] = []
    sender = asyncio.create_task(batcher.send_continuously())
    try:
        writing = asyncio.create_task(batcher.run([RegisterThread("c/1", "u1")]))
        _, through = await backend.held.next_batch()
        batcher.run_later([RegisterThread("c/2", "u2")], then=lambda: cleaned.append("c/2"))
        sender.cancel()
        await asyncio.sleep(0)
        assert not sender.done()  # it waits for the batch on its way
        through.set()
        with pytest.raises(asyncio.CancelledError):
            await sender
        assert await writing == [None]  # written: its caller hears so
        assert backend.registry_get_uuid("c/1") == "u1"
        assert cleaned == ["c/2"]  # the write that came meanwhile, made the synchronous way
        assert backend.registry_get_uuid("c/2") == "u2"
        assert backend.batch_sizes == [1]  # the held batch went through the writer, this one through apply
    finally:
        sender.cancel()


async def test_the_event_loop_writer_reconnects_to_a_restarted_redis_as_the_synchronous_client_does() -> None:
    """A connection Redis closed (a restart, an idle timeout) is retried on a fresh one: the batch is written,
    instead of failing every caller with backend-unavailable and opening the circuit."""
    server = RedisServer()
    server.start()
    backend = RedisBackend(server.url, prefix="restarted:", fail_fast_seconds=None)
    try:
        async with backend.writer() as writer:
            assert await writer.apply([RegisterThread("a/b", "u1")]) == [None]
            server.stop()
            server.start()  # on the same port; the writer's connection is closed
            assert await writer.apply([RegisterThread("a/c", "u2")]) == [None]
        assert not backend.circuit.is_open
        assert backend.registry_get_uuid("a/c") == "u2"
    finally:
        backend.close()
        server.close()


async def test_a_turn_scheduled_before_the_sender_started_leaves_its_writes_to_the_sender() -> None:
    """Order holds at start too: a turn queued while no sender ran must not send beside the sender's batch."""
    backend = OverlappingBackend()
    batcher = StateBatcher(backend)
    sender = asyncio.create_task(batcher.send_continuously())  # its first step runs first...
    asyncio.get_running_loop().call_soon(batcher.run_later, [RegisterThread("c/b", "second")])  # ...then this
    batcher.run_later([RegisterThread("c/a", "first")])  # queued before the sender ran: schedules a turn
    try:
        ops, through = await backend.held.next_batch()
        assert ops == [RegisterThread("c/a", "first")]
        await asyncio.sleep(0)  # the turn scheduled at the start has run by now
        assert backend.batch_sizes == []  # nothing went beside the batch on its way
        through.set()
        ops, through = await backend.held.next_batch()
        assert ops == [RegisterThread("c/b", "second")]
        through.set()
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
