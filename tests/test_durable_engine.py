"""The durable engine in process, on a real redis-server: the door's edge cases."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest
import redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.durable_support import started
from tests.primitive_support import Count, add_one, double
from tests.redis_server import RedisServer
from tests.support import Ping, Pong, echo, envelope, hangs, ping_xml
from xml_pipeline import ErrorCode
from xml_pipeline.cluster import engine as engine_module
from xml_pipeline.cluster import replies as replies_module
from xml_pipeline.cluster.engine import DurableEngine, DurableSettings
from xml_pipeline.cluster.hop import Hop
from xml_pipeline.cluster.store import BacklogFull, ClientReply, ClusterStore, Effects, Keys, StillLive
from xml_pipeline.handler import HandlerMetadata, HandlerResponse
from xml_pipeline.memory.context_buffer import BufferSlot
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.message.envelope import MESSAGE_END, envelope_bytes
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message.safe_xml import XmlLimits
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.engine import Accepted, Refused
from xml_pipeline.message_bus.thread_registry import ThreadRecord, chain_key, new_thread_id
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.primitives import BufferComplete, BufferStart, SequenceComplete, SequenceStart

ALICE = ClientAccess.authenticated("alice", frozenset({"echo"}))


async def payloads_collected(
    engine: DurableEngine, thread: str, mode: str, *, owner: str | None = None, ended: bool | None = None
) -> list[bytes]:
    """The reply payloads a collect of ``thread`` returns (waiting up to 10 s); it must find the conversation,
    and, given ``ended``, say whether it ended."""
    collected = await engine.collect(thread, mode, 10, owner=owner)
    assert collected is not None
    if ended is not None:
        assert collected.ended is ended
    return [reply.payload_xml for reply in collected.replies]


def echo_listener() -> Listener:
    return Listener("echo", [Ping], echo, peers=[], ingress=True)


@pytest.fixture
async def engine(redis_server: RedisServer) -> AsyncIterator[DurableEngine]:
    async with started(redis_server, "door-edges:", [echo_listener()]) as durable:
        yield durable


async def test_opening_a_conversation_twice_stores_it_once(engine: DurableEngine) -> None:
    """A retried opening (its answer lost on the way back) must not store the message a second time."""
    store: ClusterStore = engine.store
    listener = engine.listeners["echo"]
    hop, effects = engine._router.opening("console", listener, Ping("once"), b"<Ping><text>once</text></Ping>")
    for _ in range(2):
        await store.commit(hop.conversation, effects, opening=("console", "echo", -1))
    assert await store.client.xlen(store.keys.stream("echo")) <= 1  # the first may already be handled
    assert await payloads_collected(engine, hop.conversation, "end") == [b"<Pong><text>once</text></Pong>"]


async def test_a_step_that_ends_its_conversation_writes_its_reply_and_the_end_as_one_entry(
    engine: DurableEngine,
) -> None:
    """One XADD fewer per conversation; a reader still sees the reply, then the end."""
    accepted = await engine.accept(envelope(ping_xml("one")))
    assert isinstance(accepted, Accepted)
    seen = await engine._replies.wait(accepted.thread, b"0", 10)  # read without collecting
    assert [reply.payload_xml if reply else None for _, reply in seen] == [b"<Pong><text>one</text></Pong>", None]
    [(_, fields)] = await engine.store.client.xrange(engine.store.keys.replies(accepted.thread))
    assert {b"reply", b"end"} <= set(fields)
    assert await payloads_collected(engine, accepted.thread, "first", ended=True) == [b"<Pong><text>one</text></Pong>"]


async def test_collecting_a_conversation_this_daemon_opened_asks_redis_nothing_about_it(
    redis_server: RedisServer, engine: DurableEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon that stored a conversation knows it exists and whose it is; another daemon asks Redis."""
    looked: list[str] = []
    look = engine.store.look

    async def counted(conversation: str) -> tuple[str | None, bool]:
        looked.append(conversation)
        return await look(conversation)

    monkeypatch.setattr(engine.store, "look", counted)
    accepted = await engine.accept(envelope(ping_xml("mine"), sender="alice"), access=ALICE)
    assert isinstance(accepted, Accepted)
    assert await engine.collect(accepted.thread, "first", 1, owner="bob") is None  # still alice's alone
    collected = await engine.collect(accepted.thread, "end", 10, owner="alice")
    assert collected is not None
    assert collected.ended
    assert looked == []
    assert await engine.collect(accepted.thread, "end", 10, owner="alice") is None  # collected: gone, at once
    assert looked == [accepted.thread]

    async with started(redis_server, "door-edges:", [echo_listener()]) as other:
        opened_elsewhere = await other.accept(envelope(ping_xml("theirs"), sender="alice"), access=ALICE)
        assert isinstance(opened_elsewhere, Accepted)
        assert await engine.collect(opened_elsewhere.thread, "end", 10, owner="bob") is None
        assert await payloads_collected(engine, opened_elsewhere.thread, "end", owner="alice") == [
            b"<Pong><text>theirs</text></Pong>"
        ]
    assert looked == [accepted.thread, opened_elsewhere.thread, opened_elsewhere.thread]


async def test_only_the_client_that_sent_a_message_may_collect_its_replies(engine: DurableEngine) -> None:
    accepted = await engine.accept(envelope(ping_xml("mine"), sender="alice"), access=ALICE)
    assert isinstance(accepted, Accepted)
    assert await engine.collect(accepted.thread, "end", 1, owner="bob") is None
    collected = await engine.collect(accepted.thread, "end", 10, owner="alice")
    assert collected is not None
    assert collected.ended


async def test_a_store_that_times_out_says_where_the_replies_would_be(
    engine: DurableEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis may have run a call that timed out: the client is told not to resend blindly, and where to look."""

    async def times_out(*args: object, **kwargs: object) -> bool:
        raise RedisTimeoutError("Timeout reading from 127.0.0.1")

    monkeypatch.setattr(engine.store, "commit", times_out)
    refused = await engine.accept(envelope(ping_xml("maybe")))
    assert isinstance(refused, Refused)
    assert refused.code is ErrorCode.BACKEND_UNCERTAIN
    assert refused.code.retry_allowed is False
    assert f"thread {refused.thread}" in refused.detail


async def test_consumers_of_gone_daemons_leave_the_group(redis_server: RedisServer) -> None:
    """Every daemon start adds a consumer; ones that hold nothing and stay silent are removed."""
    settings = DurableSettings(reply_retention_seconds=30, forget_consumers_after_seconds=0)
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with started(redis_server, "gone-consumers:", [echo_listener()], settings=settings) as durable:
            stream = durable.store.keys.stream("echo")
            for ghost in ("ghost-1", "ghost-2"):  # daemons that joined once and were never seen again
                assert client.xgroup_createconsumer(stream, "xml-pipeline", ghost) == 1
            await durable._forget_gone_consumers()  # the reclaimer does this now and then
            names = {c["name"].decode() for c in client.xinfo_consumers(stream, "xml-pipeline")}
            assert not names & {"ghost-1", "ghost-2"}
            assert names <= {durable.daemon_id}
    finally:
        client.close()


async def test_the_commits_of_one_loop_turn_share_one_script_call(
    engine: DurableEngine, redis_server: RedisServer
) -> None:
    """Forty messages at once: eighty commits (forty stores, forty outcomes) in far fewer script calls."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        accepted = await asyncio.gather(*(engine.accept(envelope(ping_xml(f"m{i}"))) for i in range(40)))
        assert all(isinstance(outcome, Accepted) for outcome in accepted)
        collected = await asyncio.gather(
            *(engine.collect(outcome.thread, "end", 10) for outcome in accepted if isinstance(outcome, Accepted))
        )
        calls = client.info("commandstats")["cmdstat_evalsha"]["calls"] - before
    finally:
        client.close()
    texts = sorted(reply.payload_xml for c in collected if c is not None for reply in c.replies)
    assert texts == sorted(f"<Pong><text>m{i}</text></Pong>".encode() for i in range(40))
    assert calls <= 20


async def test_a_retried_opening_is_answered_as_stored_even_when_the_backlog_filled_meanwhile(
    redis_server: RedisServer,
) -> None:
    """A client whose answer got lost retries; the store went through, so the retry is no `overload`."""
    settings = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    async with started(redis_server, "retry-full:", [echo_listener()], settings=settings) as durable:
        store, listener = durable.store, durable.listeners["echo"]
        hop, effects = durable._router.opening("console", listener, Ping("once"), b"<Ping><text>once</text></Ping>")
        await store.commit(hop.conversation, effects, opening=("console", "echo", 1))
        await store.commit(hop.conversation, effects, opening=("console", "echo", 1))  # full now, yet stored
        assert await store.client.xlen(store.keys.stream("echo")) == 1
        other, more = durable._router.opening("console", listener, Ping("new"), b"<Ping><text>new</text></Ping>")
        with pytest.raises(BacklogFull):
            await store.commit(other.conversation, more, opening=("console", "echo", 1))


async def test_a_full_backlog_refuses_the_openings_over_its_cap_and_stores_the_others_of_the_same_call(
    redis_server: RedisServer,
) -> None:
    """Ten messages in one loop turn, room for four: one script call, four stored, six told `overload`."""
    settings = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    limits = PumpLimits(queue_size=4)
    async with started(redis_server, "full-backlog:", [echo_listener()], limits=limits, settings=settings) as durable:
        outcomes = await asyncio.gather(*(durable.accept(envelope(ping_xml(f"m{i}"))) for i in range(10)))
        stored = [outcome for outcome in outcomes if isinstance(outcome, Accepted)]
        refused = [outcome for outcome in outcomes if isinstance(outcome, Refused)]
        assert len(stored) == 4
        assert {outcome.code for outcome in refused} == {ErrorCode.OVERLOAD}
        assert await durable.store.client.xlen(durable.store.keys.stream("echo")) == 4


async def test_a_hop_this_daemon_made_is_handled_without_parsing_it_again(
    engine: DurableEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The door decoded the message already; the daemon that takes it from the stream uses that payload."""
    parsed: list[bytes] = []
    real_parse = engine_module.parse_checked

    def counting_parse(raw: bytes, limits: XmlLimits) -> Any:
        parsed.append(raw)
        return real_parse(raw, limits)

    monkeypatch.setattr(engine_module, "parse_checked", counting_parse)
    accepted = await engine.accept(envelope(ping_xml("once")))
    assert isinstance(accepted, Accepted)
    assert await payloads_collected(engine, accepted.thread, "end") == [b"<Pong><text>once</text></Pong>"]
    assert parsed == []


async def test_a_wait_without_time_still_returns_what_is_stored(engine: DurableEngine) -> None:
    """``wait=end`` with timeout 0 on a conversation that ended: its replies and its end, not nothing."""
    accepted = await engine.accept(envelope(ping_xml("done")))
    assert isinstance(accepted, Accepted)
    after, ended = b"0", False
    async with asyncio.timeout(10):
        while not ended:  # read as the reply watcher reads, which forgets nothing
            entries = await engine._replies.wait(accepted.thread, after, 10)
            after = entries[-1][0] if entries else after
            ended = any(reply is None for _, reply in entries)
    collected = await engine.collect(accepted.thread, "end", 0)
    assert collected is not None
    assert collected.ended
    assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>done</text></Pong>"]


class Gate:
    """A handler held until the test opens it, so a conversation stays live as long as the test needs."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def handler(self, payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        async with asyncio.timeout(10):
            await self.opened.wait()
        return HandlerResponse.respond(Pong(payload.text))


@pytest.fixture
async def gated(redis_server: RedisServer) -> AsyncIterator[tuple[DurableEngine, Gate]]:
    gate = Gate()
    listeners = [Listener("gate", [Ping], gate.handler, peers=[], ingress=True), echo_listener()]
    try:
        async with started(redis_server, "continue:", listeners) as durable:
            yield durable, gate
            gate.opened.set()
    finally:
        gate.opened.set()


async def test_an_opening_on_a_thread_that_names_no_live_conversation_looks_once(engine: DurableEngine) -> None:
    """The door's two questions (is this a retry? is the thread the client's live conversation?) are one
    EXISTS when the answer to both is no, the common case: each call a script makes costs Redis as much
    as a small command does again."""
    client = engine.store.client
    await client.config_resetstat()
    accepted = await engine.accept(envelope(ping_xml("once"), thread=new_thread_id()))
    stats = await client.info("commandstats")  # the door's commit is made; the step after it asks neither
    assert isinstance(accepted, Accepted)
    assert stats["cmdstat_exists"]["calls"] == 1
    assert "cmdstat_hmget" not in stats
    assert await payloads_collected(engine, accepted.thread, "end") == [b"<Pong><text>once</text></Pong>"]


async def test_a_client_continues_its_live_conversation_as_on_one_daemon(
    gated: tuple[DurableEngine, Gate],
) -> None:
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    again = await engine.accept(envelope(ping_xml("more"), to="echo", thread=first.thread))
    assert again == Accepted(first.thread)
    early = await engine.collect(first.thread, "first", 10)
    assert early is not None
    assert [reply.payload_xml for reply in early.replies] == [b"<Pong><text>more</text></Pong>"]
    assert not early.ended  # the gate still holds the first message
    gate.opened.set()
    assert await payloads_collected(engine, first.thread, "end", ended=True) == [b"<Pong><text>slow</text></Pong>"]


async def test_another_sender_or_an_ended_conversation_starts_a_new_one(gated: tuple[DurableEngine, Gate]) -> None:
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    stranger = await engine.accept(envelope(ping_xml("mine"), sender="mallory", to="echo", thread=first.thread))
    assert isinstance(stranger, Accepted)
    assert stranger.thread != first.thread
    gate.opened.set()
    assert await payloads_collected(engine, first.thread, "end") == [b"<Pong><text>slow</text></Pong>"]
    late = await engine.accept(envelope(ping_xml("late"), to="echo", thread=first.thread))
    assert isinstance(late, Accepted)
    assert late.thread != first.thread


async def test_a_conversation_that_ended_between_the_look_and_the_store_is_not_continued(
    gated: tuple[DurableEngine, Gate], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = gated
    first = await engine.accept(envelope(ping_xml("done"), to="echo"))
    assert isinstance(first, Accepted)
    assert await engine.collect(first.thread, "end", 10) is not None

    commit = engine.store.commit
    said_live: list[str] = []

    async def live_a_moment_ago(conversation: str, effects: Effects, **options: Any) -> bool:
        if options.get("unless_live"):  # what the opening found just before the conversation ended
            said_live.append(options["unless_live"])
            raise StillLive("live a moment ago")
        return await commit(conversation, effects, **options)

    monkeypatch.setattr(engine.store, "commit", live_a_moment_ago)
    late = await engine.accept(envelope(ping_xml("late"), to="echo", thread=first.thread))
    assert said_live == [first.thread]
    assert isinstance(late, Accepted)
    assert late.thread != first.thread
    assert await payloads_collected(engine, late.thread, "end") == [b"<Pong><text>late</text></Pong>"]


async def test_a_continuation_retried_after_its_conversation_ended_is_not_refused_as_not_live(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """redis-py sends a script call again when the connection drops after Redis ran it. If the continued
    conversation ended meanwhile, the repeat must still say "stored already": NotLive would make the door
    open a new conversation with the same message, which then runs twice."""
    engine, gate = gated
    store: ClusterStore = engine.store
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    hop, effects = engine._router.continuing(
        "console", engine.listeners["echo"], first.thread, Ping("more"), b"<Ping><text>more</text></Ping>"
    )
    cap = ("console", "echo", -1)
    await store.commit(first.thread, effects, opening=cap, continues=hop.thread)
    gate.opened.set()
    collected = await engine.collect(first.thread, "end", 10)
    assert collected is not None
    assert collected.ended
    assert sorted(reply.payload_xml for reply in collected.replies) == [
        b"<Pong><text>more</text></Pong>",
        b"<Pong><text>slow</text></Pong>",
    ]
    # the same call again, as redis-py's Retry sends it
    assert (await store.commit(first.thread, effects, opening=cap, continues=hop.thread)).reply_ids == []


async def test_an_opening_on_the_thread_of_its_clients_live_conversation_writes_nothing(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """The door's opening asks whether the thread is the client's live conversation (instead of a look of
    its own before every opening); when it is, it stores nothing, and only the continuation is stored."""
    engine, gate = gated
    store: ClusterStore = engine.store
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    hop, effects = engine._router.opening(
        "console", engine.listeners["echo"], Ping("x"), b"<Ping><text>x</text></Ping>"
    )
    cap = ("console", "echo", -1)
    with pytest.raises(StillLive):
        await store.commit(hop.conversation, effects, opening=cap, unless_live=first.thread)
    assert not await store.client.exists(store.keys.conversation(hop.conversation))
    assert await store.client.xlen(store.keys.stream("echo")) == 0
    # another client's thread, or a conversation opened with an identity, is not this client's to continue
    await store.commit(hop.conversation, effects, opening=("mallory", "echo", -1), unless_live=first.thread)
    assert await payloads_collected(engine, hop.conversation, "end") == [b"<Pong><text>x</text></Pong>"]
    gate.opened.set()
    assert await payloads_collected(engine, first.thread, "end") == [b"<Pong><text>slow</text></Pong>"]


async def test_replies_written_by_another_daemon_reach_the_waiter_on_the_opening_daemon_through_its_inbox(
    redis_server: RedisServer,
) -> None:
    """The door's daemon waits for its conversations' news instead of reading their streams: a reply that
    another daemon commits puts a notice in the door's inbox, and only then does its waiter read. The waiter's
    grace (after which it would read anyway) is longer than the collect, so only the notice can answer it."""
    door_only = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    async with (
        started(redis_server, "inbox:", [echo_listener()], settings=door_only) as door,
        started(redis_server, "inbox:", [echo_listener()]) as worker,
    ):
        door._replies._home_grace = 60.0
        accepted = await door.accept(envelope(ping_xml("far")))
        assert isinstance(accepted, Accepted)
        assert await payloads_collected(door, accepted.thread, "end") == [b"<Pong><text>far</text></Pong>"]
        assert "echo" in worker.served
        assert "echo" not in door.served
        # answered by the worker's commit here, a wait on the worker takes the reply without reading it
        second = await worker.accept(envelope(ping_xml("near")))
        assert isinstance(second, Accepted)
        assert await payloads_collected(worker, second.thread, "end") == [b"<Pong><text>near</text></Pong>"]


async def test_the_heartbeat_makes_an_expired_inbox_again_and_its_waiters_read_what_they_missed(
    redis_server: RedisServer,
) -> None:
    """An inbox that expired (the daemon was paused past its TTL, or Redis restarted empty) lost its notices:
    the heartbeat makes it again, and every waiter of a conversation opened here reads at once."""
    door_only = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    async with (
        started(redis_server, "lost-inbox:", [echo_listener()], settings=door_only) as door,
        started(redis_server, "lost-inbox:", [echo_listener()]) as worker,
    ):
        store: ClusterStore = door.store
        door._replies._home_grace = 60.0
        inbox = store.keys.inbox(door.daemon_id)
        assert 0 < await store.client.ttl(inbox) <= door._heartbeat_ttl
        await store.client.unlink(inbox)  # as if it had expired: the worker's notice finds nothing to add to
        accepted = await door.accept(envelope(ping_xml("missed")))
        assert isinstance(accepted, Accepted)
        waiting = asyncio.create_task(door._replies.wait(accepted.thread, b"0", 10, home=True))
        replies = store.keys.replies(accepted.thread)
        assert await worker.store.client.xread({replies: "0"}, block=10_000)  # the worker committed the reply
        assert not await store.client.exists(inbox)
        await door._heartbeat()
        assert await store.client.exists(inbox)
        entries = await waiting
        assert [reply.payload_xml if reply else None for _, reply in entries] == [
            b"<Pong><text>missed</text></Pong>",
            None,
        ]


async def test_a_handler_that_overruns_its_timeout_answers_handler_timeout_and_the_engine_goes_on(
    redis_server: RedisServer,
) -> None:
    """The durable engine keeps in-process deadlines on the pump's one shared timer, with the same outcome
    as a timer per call: the client hears handler-timeout and every other message is served."""
    hanger = Listener("hanger", [Ping], hangs, peers=[], ingress=True, timeout_seconds=0.2)
    async with started(redis_server, "deadline:", [hanger, echo_listener()]) as durable:
        stuck = await durable.accept(envelope(ping_xml("stuck"), to="hanger"))
        served = await durable.accept(envelope(ping_xml("served"), to="echo"))
        assert isinstance(stuck, Accepted)
        assert isinstance(served, Accepted)
        assert await payloads_collected(durable, served.thread, "end") == [b"<Pong><text>served</text></Pong>"]
        collected = await durable.collect(stuck.thread, "end", 10)
        assert collected is not None
        assert collected.ended
        [error] = collected.replies
        assert b"handler-timeout" in error.envelope
        assert b"did not finish within 0.2s" in error.envelope


async def test_a_wait_gets_its_replies_while_more_conversations_than_one_read_covers_are_awaited(
    engine: DurableEngine,
) -> None:
    """One blocking read covers at most MAX_STREAMS_PER_READ reply streams; a wait beyond them (here the
    1001st, behind a thousand clients waiting on threads that never answer) must still get its replies."""
    idle = [
        asyncio.create_task(engine._replies.wait(new_thread_id(), b"0", 30))
        for _ in range(replies_module.MAX_STREAMS_PER_READ)
    ]
    try:
        await asyncio.sleep(0)  # each wait registers before its first await
        assert len(engine._replies._waiters) == len(idle)
        accepted = await engine.accept(envelope(ping_xml("behind")))
        assert isinstance(accepted, Accepted)
        collected = await engine.collect(accepted.thread, "end", 5)
    finally:
        for task in idle:
            task.cancel()
        await asyncio.gather(*idle, return_exceptions=True)
    assert collected is not None
    assert collected.ended
    assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>behind</text></Pong>"]


async def test_a_client_without_a_token_cannot_continue_the_conversation_of_a_client_with_one(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """On the socket a client needs no token and may send as any name: sending as "alice" on alice's live
    thread must not add a hop to her conversation (whose replies she alone reads), but open one of its own."""
    engine, gate = gated
    alice = ClientAccess.authenticated("alice", frozenset({"gate", "echo"}))
    first = await engine.accept(envelope(ping_xml("slow"), sender="alice", to="gate"), access=alice)
    assert isinstance(first, Accepted)
    posing = ClientAccess.anonymous()
    forged = await engine.accept(
        envelope(ping_xml("injected"), sender="alice", to="echo", thread=first.thread), access=posing
    )
    assert isinstance(forged, Accepted)
    assert forged.thread != first.thread
    gate.opened.set()
    assert await payloads_collected(engine, first.thread, "end", owner="alice") == [b"<Pong><text>slow</text></Pong>"]
    assert await payloads_collected(engine, forged.thread, "end") == [b"<Pong><text>injected</text></Pong>"]


async def test_the_history_of_a_live_conversation_holds_each_hop_and_reply_with_its_payload(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """A payload travels to Redis once per commit and its history slot is built from it there: every slot
    still reads back whole (sender, target, thread and payload), for hops and for replies alike."""
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    assert await engine.accept(envelope(ping_xml("more"), to="echo", thread=first.thread)) == Accepted(first.thread)
    # echo's reply is committed, the gate still holds
    assert await payloads_collected(engine, first.thread, "first") == [b"<Pong><text>more</text></Pong>"]
    slots = engine.buffer.get_thread(first.thread)
    assert [(slot.from_id, slot.to_id, slot.payload_xml) for slot in slots] == [
        ("console", "gate", ping_xml("slow").encode()),
        ("console", "echo", ping_xml("more").encode()),
        ("echo", "console", b"<Pong><text>more</text></Pong>"),
    ]
    assert slots[0].hop_thread != slots[1].hop_thread  # each message its own thread
    assert slots[2].hop_thread == first.thread  # the reply, on the client's thread
    gate.opened.set()


async def test_a_hop_travels_as_its_history_slot_so_redis_stores_one_blob_for_both(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """Joining a slot's head to its payload in Lua hashes every byte again: the hop's stream entry carries
    the slot itself, its header saying where the payload starts, and the hop read from it is the one sent."""
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)  # stored: the gate holds the hop, still in its stream
    client = engine.store.client
    [(_, fields)] = await client.xrange(engine.store.keys.stream("gate"))
    [slot] = await client.lrange(f"continue:buf:{first.thread}", 0, -1)
    assert fields[b"payload"] == slot
    hop = Hop.from_fields(fields)
    assert hop.payload_xml == ping_xml("slow").encode()
    assert hop.conversation == first.thread
    gate.opened.set()


def test_a_hop_whose_payload_value_holds_more_before_it_says_where_the_payload_starts() -> None:
    hop = Hop("c", ("console", "echo"), ("c", "t"), "console", "tests.support:Ping", b"<Ping/>", "ab")
    assert Hop.from_fields({b"h": hop.header(payload_at=5).encode(), b"payload": b"slot:<Ping/>"}) == hop
    assert Hop.from_fields({b"h": str(hop.fields()[1]).encode(), b"payload": b"<Ping/>"}) == hop


def test_an_opening_sends_no_op_for_the_conversations_own_thread_and_other_chains_without_its_id() -> None:
    """The conversation's hash is its own thread's registration, so that thread costs the script nothing;
    another thread's chain goes without the conversation's id, which the script has already."""
    conversation = new_thread_id()
    effects = Effects(
        registrations=[
            (chain_key(conversation, ["console"]), conversation),
            (chain_key(conversation, ["console", "echo"]), "t1"),
        ]
    )
    ops, blobs = effects.arguments(Keys("p:"), conversation)
    assert ops == ["r", "/console/echo", "t1"]
    assert blobs == []


def test_a_hops_fields_are_named_in_order() -> None:
    """The commit finds a hop's payload among its fields by position (:data:`Hop.FIELD_NAMES`)."""
    hop = Hop("c", ("console", "echo"), ("c", "t"), "console", "tests.support:Ping", b"<Ping/>")
    assert hop.fields()[::2] == list(Hop.FIELD_NAMES)
    as_read = {str(name).encode(): value if isinstance(value, bytes) else value.encode() for name, value in
               zip(hop.fields()[::2], hop.fields()[1::2], strict=True)}  # fmt: skip
    assert Hop.from_fields(as_read) == hop


def test_a_hop_is_two_fields_and_one_written_a_field_each_by_an_earlier_version_is_still_read() -> None:
    """Each field of a stream entry costs Redis work on every write and read, so a hop is its header and its
    payload. Entries an earlier daemon wrote a field each (waiting in a stream or the dead letters when the
    organism is upgraded) still read as the same hop."""
    hop = Hop("c", ("console", "router", "echo"), ("c", "t1", "t2"), "router", "tests.support:Ping", b"<Ping/>", "ab")
    assert len(hop.fields()) == 4
    earlier = {
        b"conv": b"c",
        b"chain": b"console/router/echo",
        b"threads": b"c/t1/t2",
        b"from": b"router",
        b"type": b"tests.support:Ping",
        b"payload": b"<Ping/>",
        b"trace": b"ab",
    }
    assert Hop.from_fields(earlier) == hop
    del earlier[b"trace"]  # the first durable daemons wrote none
    assert Hop.from_fields(earlier) == replace(hop, trace="")


async def test_a_live_conversation_keeps_its_state_and_owner_until_its_end_then_only_the_replies_expire(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """No key of a live conversation expires, however long it lives (a TTL would only lose the state of a
    conversation whose hop waits in a long backlog, and its owner, making its replies anyone's); the end
    deletes them, and what it leaves for the client (replies, owner) expires after the reply retention."""
    engine, gate = gated
    alice = ClientAccess.authenticated("alice", frozenset({"gate", "echo"}))
    first = await engine.accept(envelope(ping_xml("slow"), sender="alice", to="gate"), access=alice)
    assert isinstance(first, Accepted)
    more = await engine.accept(envelope(ping_xml("more"), sender="alice", to="echo", thread=first.thread), access=alice)
    assert more == Accepted(first.thread)
    # the step above was committed
    assert await payloads_collected(engine, first.thread, "first", owner="alice") == [b"<Pong><text>more</text></Pong>"]
    client, prefix = engine.store.client, engine.store.keys.prefix

    async def conversation_keys() -> list[bytes]:
        """Keys of conversation state (not streams, heartbeats or continuation marks, which expire by design)."""
        kinds = ("conv", "buf", "reg", "r", "r-owner")
        return [key async for key in client.scan_iter(match=f"{prefix}*") if _kind(key, prefix) in kinds]

    live = await conversation_keys()
    assert {"conv", "buf", "reg", "r"} == {_kind(key, prefix) for key in live}
    assert {key: await client.ttl(key) for key in live} == dict.fromkeys(live, -1)  # none expires while live
    assert await engine.collect(first.thread, "first", 0, owner="mallory") is None  # the owner is kept meanwhile

    gate.opened.set()
    rest = await engine.collect(first.thread, "end", 10, owner="alice")
    assert rest is not None
    assert rest.ended
    [left] = await conversation_keys()  # the replies were collected: only who may ask for them is left
    assert _kind(left, prefix) == "r-owner"
    assert 0 < await client.ttl(left) <= engine.store.reply_retention


def _kind(key: bytes, prefix: str) -> str:
    return key.decode().removeprefix(prefix).split(":")[0]


@contextlib.asynccontextmanager
async def door_and_worker(
    redis_server: RedisServer, prefix: str, gate: Gate, *, collect_grace_seconds: float
) -> AsyncIterator[tuple[DurableEngine, DurableEngine]]:
    """Two daemons of one organism: a door that handles nothing, and a worker that handles ``gate``."""
    async with started(
        redis_server, prefix, [Listener("gate", [Ping], gate.handler, peers=[], ingress=True)]
    ) as worker:
        backend = RedisBackend(redis_server.url, prefix=prefix, fail_fast_seconds=None)
        door = DurableEngine(
            Organism.of("door", [Listener("gate", [Ping], gate.handler, peers=[], ingress=True)]),
            backend,
            DurableSettings(reply_retention_seconds=30, serve=frozenset()),
            collect_grace_seconds=collect_grace_seconds,
        )
        await door.start()
        try:
            yield door, worker
        finally:
            gate.opened.set()
            await door.stop(drain_timeout=5)  # a second stop of a stopped engine changes nothing
            backend.close()


async def test_a_stopping_daemon_lets_its_waiting_clients_collect_replies_handled_elsewhere(
    redis_server: RedisServer,
) -> None:
    gate = Gate()
    async with door_and_worker(redis_server, "grace:", gate, collect_grace_seconds=5) as (door, _):
        accepted = await door.accept(envelope(ping_xml("late"), to="gate"))
        assert isinstance(accepted, Accepted)
        waiting = asyncio.create_task(door.collect(accepted.thread, "end", 30))
        await asyncio.sleep(0)  # the collect has begun: the door now counts it
        stopping = asyncio.create_task(door.stop(drain_timeout=5))
        await asyncio.sleep(0)
        gate.opened.set()  # the worker finishes while the door stops
        async with asyncio.timeout(10):
            collected = await waiting
            await stopping
    assert collected is not None
    assert collected.ended
    assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>late</text></Pong>"]


async def test_past_the_grace_a_waiting_client_hears_what_came_and_collects_the_rest_elsewhere(
    redis_server: RedisServer,
) -> None:
    gate = Gate()
    async with door_and_worker(redis_server, "grace-over:", gate, collect_grace_seconds=0.2) as (door, worker):
        accepted = await door.accept(envelope(ping_xml("later"), to="gate"))
        assert isinstance(accepted, Accepted)
        waiting = asyncio.create_task(door.collect(accepted.thread, "end", 30))
        await asyncio.sleep(0)
        async with asyncio.timeout(10):  # not the 30 s the client asked for: the door answers as it stops
            await door.stop(drain_timeout=5)
            so_far = await waiting
        assert so_far is not None
        assert not so_far.ended
        assert so_far.replies == []
        gate.opened.set()
        rest = await worker.collect(accepted.thread, "end", 10)
    assert rest is not None
    assert rest.ended
    assert [reply.payload_xml for reply in rest.replies] == [b"<Pong><text>later</text></Pong>"]


async def test_a_conversation_with_thousands_of_threads_still_ends_and_leaves_nothing(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """The end deletes every registry key the conversation wrote, however many: more than one Lua ``unpack``
    takes (about 8,000 values) must not make its last commit fail, and with it every commit of its script call.

    A long conversation gets there: each message a client adds to it, each call a coordinator makes, is a
    thread of its own (a registry key), and nothing bounds their number; here they are registered directly.
    """
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    for batch in range(82):
        registrations = [(f"{first.thread}/console/echo/{batch}-{n}", new_thread_id()) for n in range(50)]
        await engine.store.commit(first.thread, Effects(registrations=registrations))
    client, prefix = engine.store.client, engine.store.keys.prefix
    assert await client.hlen(engine.store.keys.conversation(first.thread)) > 8_000
    gate.opened.set()
    assert await payloads_collected(engine, first.thread, "end", ended=True) == [b"<Pong><text>slow</text></Pong>"]
    left = [key async for key in client.scan_iter(match=f"{prefix}*") if _kind(key, prefix) in ("conv", "buf", "reg")]
    assert left == []


async def test_reading_a_live_conversations_history_or_threads_gives_them_no_ttl(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """A handler that reads its conversation's history or looks its threads up (through the context buffer and
    the thread registry) must not give that state a TTL: a live conversation's state has none, so that one
    whose next hop waits in a long backlog keeps it (a read then would have let it expire after ``redis_ttl``)."""
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    more = await engine.accept(envelope(ping_xml("more"), to="echo", thread=first.thread))
    assert more == Accepted(first.thread)
    early = await engine.collect(first.thread, "first", 10)  # echo's step is committed, the gate still holds
    assert early is not None
    slots = engine.buffer.get_thread(first.thread)
    assert len(slots) == 3
    gate_thread = slots[0].hop_thread
    assert engine.registry.lookup(gate_thread) is not None
    client, prefix = engine.store.client, engine.store.keys.prefix
    live = [key async for key in client.scan_iter(match=f"{prefix}*") if _kind(key, prefix) in ("conv", "buf", "reg")]
    assert {_kind(key, prefix) for key in live} == {"conv", "buf", "reg"}
    assert {key: await client.ttl(key) for key in live} == dict.fromkeys(live, -1)
    gate.opened.set()
    rest = await engine.collect(first.thread, "end", 10)
    assert rest is not None
    assert rest.ended


async def held_at_the_gate(engine: DurableEngine) -> tuple[str, BufferSlot]:
    """A conversation whose one hop the gate holds: its id, and its history's one slot (the hop's thread)."""
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    [slot] = engine.buffer.get_thread(first.thread)
    return first.thread, slot


async def released_leaving_nothing(engine: DurableEngine, gate: Gate, conversation: str) -> None:
    """Let the gate's hop go: the conversation ends with its reply and leaves no state behind."""
    gate.opened.set()
    assert await payloads_collected(engine, conversation, "end", ended=True) == [b"<Pong><text>slow</text></Pong>"]
    assert await _state_left(engine) == []


async def test_a_live_conversations_threads_are_in_its_hash_and_the_registry_finds_them(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """A durable conversation keeps its threads' registrations in its hash: its own thread has no registry key,
    a hop's thread one (for lookups by thread) instead of two. The registry (the reference's API, on the same
    Redis) still finds each by thread and by chain, lists them, hands out the same thread for a chain it
    knows, and forgets a thread with its chain."""
    engine, gate = gated
    conversation, slot = await held_at_the_gate(engine)
    hop_thread = slot.hop_thread
    client, prefix = engine.store.client, engine.store.keys.prefix
    assert [key async for key in client.scan_iter(match=f"{prefix}reg:*")] == [f"{prefix}reg:u:{hop_thread}".encode()]
    assert await client.get(f"{prefix}durable") == b"1"  # so the registry's batch script looks in the hash
    registry = engine.registry
    assert registry.lookup_record(conversation) == ThreadRecord(conversation, ("console",))
    assert registry.lookup_record(hop_thread) == ThreadRecord(conversation, ("console", "gate"))
    assert registry.get_or_create(("console", "gate"), conversation) == hop_thread
    assert registry.get_or_create(("console",), conversation) == conversation
    assert registry.debug_dump() == {conversation: "console", hop_thread: "console.gate"}
    assert registry.cleanup(hop_thread)
    assert registry.lookup(hop_thread) is None
    assert engine.backend.registry_get_uuid(chain_key(conversation, ("console", "gate"))) is None
    await released_leaving_nothing(engine, gate, conversation)


async def test_the_registry_forgets_a_live_conversations_own_thread_and_a_chain_registered_again_forgets_its_thread(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """The registry's contract holds for the threads a conversation's hash stands for, as it did when each had
    its keys: forgetting the conversation's own thread (which has no key) forgets it and its chain, and
    registering a chain again (through the registry, as a handler may) forgets the thread it had, the
    conversation's own or a hop's, for good."""
    engine, gate = gated
    conversation, slot = await held_at_the_gate(engine)
    hop_thread = slot.hop_thread
    registry, backend = engine.registry, engine.backend
    own_chain, hop_chain = chain_key(conversation, ("console",)), chain_key(conversation, ("console", "gate"))
    assert registry.cleanup(conversation)
    assert (registry.lookup(conversation), backend.registry_get_uuid(own_chain)) == (None, None)
    assert not registry.cleanup(conversation)
    assert registry.debug_dump() == {hop_thread: "console.gate"}
    again = new_thread_id()
    backend.registry_set(own_chain, again)
    assert (backend.registry_get_uuid(own_chain), backend.registry_get_chain(again)) == (again, own_chain)
    assert registry.cleanup(again)
    assert (backend.registry_get_uuid(own_chain), registry.lookup(conversation)) == (None, None)
    backend.registry_set(hop_chain, again)
    assert (backend.registry_get_uuid(hop_chain), registry.lookup(hop_thread)) == (again, None)
    assert backend.registry_list_all() == {again: hop_chain}
    await released_leaving_nothing(engine, gate, conversation)


async def test_threads_a_handler_registers_in_a_live_conversation_end_with_it(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """A handler may register threads of its conversation through the registry (``extend_chain``,
    ``get_or_create``, ``registry_set``): they are the conversation's, deleted at its end like the threads its
    hops made, not left behind (for ``redis_ttl``, or for ever with a TTL of 0)."""
    engine, gate = gated
    conversation, slot = await held_at_the_gate(engine)
    registry = engine.registry
    extended = registry.extend_chain(slot.hop_thread, "echo")
    assert registry.lookup(extended) == "console.gate.echo"
    assert registry.extend_chain(slot.hop_thread, "echo") == extended
    made = registry.get_or_create(("console", "elsewhere"), conversation)
    engine.backend.registry_set(chain_key(conversation, ("console", "set")), new_thread_id())
    assert registry.lookup(made) == "console.elsewhere"
    assert len(registry) == engine.backend.info()["registry_entries"] == 5  # the conversation's own thread too
    await released_leaving_nothing(engine, gate, conversation)
    assert (registry.lookup(extended), registry.lookup(made), len(registry)) == (None, None, 0)


async def test_a_conversation_opened_the_earlier_way_finds_the_threads_registered_since_in_its_hash(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """Daemons before this layout gave each chain a registry key; in a conversation they opened, a chain
    registered again since the upgrade (the client sends to the same listener again) is in the hash, and the
    registry must find that thread, not the one the earlier key still names."""
    engine, gate = gated
    conversation, slot = await held_at_the_gate(engine)
    client, keys = engine.store.client, engine.store.keys
    hop_chain = chain_key(conversation, ("console", "gate"))
    earlier = f"{keys.prefix}reg:c:{hop_chain}"  # as an earlier daemon registered the first message's thread
    await client.set(earlier, slot.hop_thread)
    await client.hset(keys.conversation(conversation), earlier, "")
    again = await engine.accept(envelope(ping_xml("again"), to="gate", thread=conversation))
    assert again == Accepted(conversation)
    later = engine.buffer.get_thread(conversation)[1].hop_thread
    assert engine.backend.registry_get_uuid(hop_chain) == later
    assert engine.registry.get_or_create(("console", "gate"), conversation) == later
    assert engine.registry.cleanup(later)
    assert engine.backend.registry_get_uuid(hop_chain) is None  # the earlier key's thread is not back
    gate.opened.set()
    assert sorted(await payloads_collected(engine, conversation, "end", ended=True)) == [
        b"<Pong><text>again</text></Pong>",
        b"<Pong><text>slow</text></Pong>",
    ]
    assert await _state_left(engine) == []


async def test_clearing_the_registry_forgets_the_threads_of_live_conversations_which_still_end(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """``ThreadRegistry.clear`` forgets every thread in the backend: those a live conversation's hash stands
    for too. The conversation goes on, and its end leaves nothing."""
    engine, gate = gated
    conversation, slot = await held_at_the_gate(engine)
    registry = engine.registry
    assert len(registry) == 2
    registry.clear()
    assert (len(registry), registry.lookup(conversation), registry.lookup(slot.hop_thread)) == (0, None, None)
    assert engine.backend.registry_get_uuid(chain_key(conversation, ("console", "gate"))) is None
    await released_leaving_nothing(engine, gate, conversation)


async def _state_left(engine: DurableEngine) -> list[bytes]:
    """Keys of conversation state and threads under the engine's prefix (none once every conversation ended)."""
    client, prefix = engine.store.client, engine.store.keys.prefix
    return [key async for key in client.scan_iter(match=f"{prefix}*") if _kind(key, prefix) in ("conv", "buf", "reg")]


@pytest.mark.parametrize("prefix", ["earlier:", "/earlier:", "#earlier:"], ids=["plain", "slash", "hash"])
async def test_registry_keys_named_the_earlier_way_are_deleted_at_the_end_whatever_the_prefix_starts_with(
    redis_server: RedisServer, prefix: str
) -> None:
    """Daemons before this layout named each registry key of a conversation in its hash (the key's name as the
    field); a conversation they opened that ends after an upgrade must not leave those keys behind (they have
    no TTL). The end tells a field naming an earlier daemon's registry key (``{prefix}reg:...``) from a chain
    (``/...``) and from a thread whose key it wrote (``#...``) by its first byte: a prefix that starts with
    either must still have those keys deleted, not taken for a chain or a thread's (and left for ever)."""
    gate = Gate()
    listeners = [Listener("gate", [Ping], gate.handler, peers=[], ingress=True)]
    try:
        async with started(redis_server, prefix, listeners) as engine:
            first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
            assert isinstance(first, Accepted)
            client, keys = engine.store.client, engine.store.keys
            earlier = [f"{prefix}reg:c:{first.thread}/console/gate", f"{prefix}reg:u:{new_thread_id()}"]
            for key in earlier:
                await client.set(key, "x")
            await client.hset(keys.conversation(first.thread), mapping=dict.fromkeys(earlier, ""))
            gate.opened.set()
            assert await payloads_collected(engine, first.thread, "end", ended=True) == [
                b"<Pong><text>slow</text></Pong>"
            ]
            assert await client.exists(*earlier) == 0
            assert await _state_left(engine) == []
    finally:
        gate.opened.set()


async def test_replies_written_before_its_end_are_collected_when_the_hash_does_not_say_so(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """A conversation's hash says whether replies were written while it lived, so that its end need not ask
    the stream. One opened by an earlier daemon says nothing: its end must then ask, or a waiter here would
    take the end's entries for all of the stream and miss the reply written before (here by another daemon,
    which tells no one)."""
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    client, keys = engine.store.client, engine.store.keys
    assert await client.hget(keys.conversation(first.thread), "replied") == b"0"
    await client.hdel(keys.conversation(first.thread), "replied")
    early = envelope_bytes("elsewhere", "console", first.thread, b"<Pong><text>early</text></Pong>")
    end = len(early) - len(MESSAGE_END)
    at = f"{end - len(b'<Pong><text>early</text></Pong>')}:{end}"
    await client.xadd(keys.replies(first.thread), {"reply": early, "type": "tests.support:Pong", "at": at})
    gate.opened.set()
    assert await payloads_collected(engine, first.thread, "end", ended=True) == [
        b"<Pong><text>early</text></Pong>",
        b"<Pong><text>slow</text></Pong>",
    ]


async def test_a_reply_written_while_the_conversation_lives_is_collected_with_the_end_committed_here(
    gated: tuple[DurableEngine, Gate], redis_server: RedisServer
) -> None:
    """A step that writes a reply while its conversation lives marks the hash, so that the step that ends it
    does not take its own entries for all of the stream: a waiter here would then miss a reply this daemon
    was never handed (here: committed through a store of its own, as by a daemon restarted since)."""
    engine, gate = gated
    first = await engine.accept(envelope(ping_xml("slow"), to="gate"))
    assert isinstance(first, Accepted)
    keys = engine.store.keys
    other = ClusterStore(
        redis_server.url, keys.prefix, socket_timeout=5, reply_retention=30, daemon_id=engine.store.daemon_id
    )
    payload = b"<Pong><text>early</text></Pong>"
    early = envelope_bytes("echo", "console", first.thread, payload)
    try:
        await other.commit(first.thread, Effects(replies=[ClientReply(early, "tests.support:Pong", payload)]))
    finally:
        await other.close()
    assert await engine.store.client.hget(keys.conversation(first.thread), "replied") == b"1"
    gate.opened.set()
    assert await payloads_collected(engine, first.thread, "end", ended=True) == [
        payload,
        b"<Pong><text>slow</text></Pong>",
    ]


async def test_reply_streams_and_the_inbox_are_read_when_redis_speaks_resp3(redis_server: RedisServer) -> None:
    """Hops are read in either protocol's shape; so must replies and notices be. With ``protocol=3`` in the
    URL, an XREAD answers a map: taken for a list of pairs, the watcher's read raised ValueError, which ended
    the daemon's task group at its first wait for a reply."""
    store = ClusterStore(
        redis_server.url + "?protocol=3", "resp3-store:", socket_timeout=5, reply_retention=30, daemon_id="d1"
    )
    replies = store.keys.replies("c")
    reader = store.dedicated_client()
    try:
        await store.client.xadd(replies, {"end": "1"})
        after = await store.open_inbox(10)
        await store.client.xadd(store.keys.inbox("d1"), {"c": "c"})
        assert [reply for _, reply in await store.replies("c", b"0")] == [None]
        read = await store.replies_of({"c": b"0"}, 100, reader, after)
        assert [reply for _, reply in read.replies["c"]] == [None]
        assert read.notices == ["c"]
    finally:
        await store.client.unlink(replies, store.keys.inbox("d1"))
        await reader.aclose()
        await store.close()


async def test_replies_are_read_when_redis_speaks_resp3(redis_server: RedisServer) -> None:
    """Two daemons on a RESP3 connection: a reply another daemon wrote reaches the door's waiter through its
    inbox, and a look (``none``) reads a reply stream."""
    resp3 = cast(RedisServer, SimpleNamespace(url=redis_server.url + "?protocol=3"))
    door_only = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    async with asyncio.timeout(30):
        async with (
            started(resp3, "resp3:", [echo_listener()], settings=door_only) as door,
            started(resp3, "resp3:", [echo_listener()]) as worker,
        ):
            accepted = await door.accept(envelope(ping_xml("far")))
            assert isinstance(accepted, Accepted)
            assert await payloads_collected(door, accepted.thread, "end") == [b"<Pong><text>far</text></Pong>"]
            near = await worker.accept(envelope(ping_xml("near")))
            assert isinstance(near, Accepted)
            replies = worker.store.keys.replies(near.thread)
            assert await worker.store.client.exists(replies) or await worker.store.client.xread(
                {replies: "0"}, block=10_000
            )
            assert await payloads_collected(door, near.thread, "none") == [b"<Pong><text>near</text></Pong>"]


async def test_news_of_a_conversation_opened_here_is_not_crowded_out_by_others_answered_here(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends, then collects later, is answered at once only because its conversation was
    remembered as stirred. Conversations opened on other daemons and answered here have no wait here that the
    memory could spare a grace; remembering them too pushes out the conversations opened here, whose waits
    then sit out the grace (here longer than the collect) although their replies are in Redis."""
    monkeypatch.setattr(replies_module, "STIRRED_REMEMBERED", 4)
    door_only = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    async with (
        started(redis_server, "crowded:", [echo_listener()]) as worker,
        started(redis_server, "crowded:", [echo_listener()], settings=door_only) as door,
    ):
        worker._replies._home_grace = 60.0
        mine = await worker.accept(envelope(ping_xml("mine")))
        assert isinstance(mine, Accepted)
        replies = worker.store.keys.replies(mine.thread)
        assert await worker.store.client.xread({replies: "0"}, block=10_000)
        for n in range(8):  # opened on the door, answered by the worker, collected on the door
            other = await door.accept(envelope(ping_xml(f"other {n}")))
            assert isinstance(other, Accepted)
            assert await payloads_collected(door, other.thread, "end") == [
                f"<Pong><text>other {n}</text></Pong>".encode()
            ]
        async with asyncio.timeout(10):
            while any(worker._held.values()):  # the worker is done with every commit, news told
                worker._freed.clear()
                await worker._freed.wait()
        collected = await worker.collect(mine.thread, "end", 3)
        assert collected is not None
        assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>mine</text></Pong>"]


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Until ``condition()`` holds (something this loop's other tasks do), for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.001)


async def test_a_client_waiting_here_for_the_end_gets_its_replies_without_redis_storing_them(
    gated: tuple[DurableEngine, Gate],
) -> None:
    """The step that ends a conversation opened here hands its replies and end to the client waiting here:
    no reply stream is made, given its retention and deleted a moment later."""
    engine, gate = gated
    accepted = await engine.accept(envelope(ping_xml("straight"), to="gate"))
    assert isinstance(accepted, Accepted)
    collecting = asyncio.create_task(engine.collect(accepted.thread, "end", 10))
    await _until(lambda: engine._replies.awaited_to_end(accepted.thread), "the client waits")
    client = engine.store.client
    await client.config_resetstat()
    gate.opened.set()
    collected = await collecting
    assert collected is not None
    assert collected.ended
    assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>straight</text></Pong>"]
    stats = await client.info("commandstats")
    assert "cmdstat_xadd" not in stats  # the step wrote no hop, and nothing for the client
    assert "cmdstat_expire" not in stats
    assert not await client.exists(engine.store.keys.replies(accepted.thread))
    assert await engine.collect(accepted.thread, "none", 0) is None  # collected: gone


async def test_an_end_handed_to_a_waiter_gone_meanwhile_is_stored_for_its_client(
    engine: DurableEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiter a commit was told of may time out (or its client leave) before the commit returns: the
    replies are then stored as if never handed, with their owner, for the client to collect later."""
    monkeypatch.setattr(engine.store, "awaited_to_end", lambda conversation: True)  # told of a waiter; none is
    accepted = await engine.accept(envelope(ping_xml("later"), sender="alice"), access=ALICE)
    assert isinstance(accepted, Accepted)
    client = engine.store.client
    replies_key = engine.store.keys.replies(accepted.thread)
    deadline = time.monotonic() + 10
    while not await client.exists(replies_key):
        assert time.monotonic() < deadline, "the replies were never stored"
        await asyncio.sleep(0.01)
    assert 0 < await client.ttl(replies_key) <= 30  # kept for the reply retention, as a stored end is
    assert await engine.collect(accepted.thread, "none", 0, owner="bob") is None  # still alice's alone
    assert await payloads_collected(engine, accepted.thread, "none", owner="alice", ended=True) == [
        b"<Pong><text>later</text></Pong>"
    ]


async def test_only_a_wait_until_the_end_lets_a_commit_hand_the_end_over(engine: DurableEngine) -> None:
    """A wait for the first reply may leave before the end: the end is stored unless someone takes it all."""
    watcher = engine._replies
    first = asyncio.create_task(watcher.wait("c1", b"0", 5))
    await asyncio.sleep(0)  # the task runs up to its first wait: its waiter is registered
    assert not watcher.awaited_to_end("c1")
    whole = asyncio.create_task(watcher.wait("c1", b"0", 5, until_end=True))
    await asyncio.sleep(0)
    assert watcher.awaited_to_end("c1")
    entries: list[replies_module.Entry] = [(b"0-1", None)]
    assert watcher.hand_over("c1", entries)
    assert await first == entries
    assert await whole == entries
    assert not watcher.hand_over("c1", entries)  # nobody waits any more: the caller stores them


async def test_a_conversation_ended_on_another_daemon_than_its_door_is_stored_for_both_waiters(
    redis_server: RedisServer,
) -> None:
    """Only the daemon that opened a conversation hands its end over: a client waiting on the door's daemon
    hears of the end through the stored stream, even when a waiter on the handling daemon took it too."""
    gate = Gate()
    listeners = [Listener("gate", [Ping], gate.handler, peers=[], ingress=True)]
    door_only = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    try:
        async with (
            started(redis_server, "far-end:", listeners, settings=door_only) as door,
            started(redis_server, "far-end:", listeners) as worker,
        ):
            accepted = await door.accept(envelope(ping_xml("both"), to="gate"))
            assert isinstance(accepted, Accepted)
            at_door = asyncio.create_task(door.collect(accepted.thread, "end", 10))
            at_worker = asyncio.create_task(worker.collect(accepted.thread, "end", 10))
            await _until(lambda: door._replies.awaited_to_end(accepted.thread), "a client waits at the door")
            await _until(lambda: worker._replies.awaited_to_end(accepted.thread), "a client waits at the worker")
            gate.opened.set()
            for collected in await asyncio.gather(at_door, at_worker):
                assert collected is not None
                assert collected.ended
                assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>both</text></Pong>"]
    finally:
        gate.opened.set()


async def test_a_hop_claimed_from_a_silent_daemon_is_handled_with_its_payload_alone(redis_server: RedisServer) -> None:
    """A hop's stream entry holds its history slot, the header saying where the payload starts: the hop a daemon
    claims (XCLAIM) from one that went silent must read back as the payload alone, newlines and all."""
    listeners = [Listener("echo", [Ping], echo, peers=[], ingress=True, timeout_seconds=0.2)]
    door_only = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    async with started(redis_server, "claimed:", listeners, settings=door_only) as door:
        text = "two\nlines\n7\n"
        accepted = await door.accept(envelope(ping_xml(text)))
        assert isinstance(accepted, Accepted)
        [(_, _, read)] = await door.store.read("silent-daemon", {"echo": 1}, 100)  # taken, never committed
        assert read.payload_xml == ping_xml(text).encode()
        claiming = DurableSettings(reply_retention_seconds=30, claim_grace_seconds=0.1, lease_seconds=0.2)
        async with started(redis_server, "claimed:", listeners, settings=claiming) as worker:
            assert await payloads_collected(door, accepted.thread, "end", ended=True) == [
                f"<Pong><text>{text}</text></Pong>".encode()
            ]
            assert worker.redeliveries == 1


class Relayed:
    """A relay that forwards to a gate held until the test opens it: a conversation of several hops, live."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.entered = asyncio.Event()

    async def gate_handler(self, payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        self.entered.set()
        return await self.gate.handler(payload, metadata)

    async def relay(self, payload: Ping | Pong, metadata: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Ping):
            return HandlerResponse(payload, to="gate")
        return HandlerResponse.respond(payload)

    def listeners(self) -> list[Listener]:
        return [
            Listener("relay", [Ping, Pong], self.relay, peers=["gate"], ingress=True),
            Listener("gate", [Ping], self.gate_handler, peers=[]),
        ]


@pytest.mark.parametrize("prefix", ["relayed:", "/relayed:", "#relayed:"], ids=["plain", "slash", "hash"])
async def test_a_relayed_conversations_hops_threads_and_history_read_back_while_it_lives_and_leave_nothing(
    redis_server: RedisServer, prefix: str
) -> None:
    """A conversation of several hops (client -> relay -> gate, the response climbing back): each hop read
    from its stream is the one sent, each thread is found by the registry by UUID and by chain (the
    conversation's own thread too), the history holds each hop's payload, and its end leaves no key behind,
    whatever the prefix starts with (chains start with '/', threads' fields in the hash with '#')."""
    relayed = Relayed()
    try:
        async with started(redis_server, prefix, relayed.listeners()) as engine:
            client, keys = engine.store.client, engine.store.keys
            before = {key async for key in client.scan_iter(match=f"{prefix}*")}
            text = "a\nb\n3\n\n"
            accepted = await engine.accept(envelope(ping_xml(text), to="relay"))
            assert isinstance(accepted, Accepted)
            conversation = accepted.thread
            await asyncio.wait_for(relayed.entered.wait(), 10)
            [(_, fields)] = await client.xrange(keys.stream("gate"))
            hop = Hop.from_fields(fields)
            forwarded = f"<Ping><text>{text}</text><count>1</count></Ping>".encode()
            assert (hop.chain, hop.sender, hop.payload_xml) == (("console", "relay", "gate"), "relay", forwarded)
            slots = engine.buffer.get_thread(conversation)
            assert [(slot.from_id, slot.to_id, slot.payload_xml) for slot in slots] == [
                ("console", "relay", ping_xml(text).encode()),
                ("relay", "gate", forwarded),
            ]
            assert hop.thread == slots[1].hop_thread
            backend = engine.backend
            for chain, thread in [
                (("console",), conversation),
                (("console", "relay"), slots[0].hop_thread),
                (("console", "relay", "gate"), slots[1].hop_thread),
            ]:
                assert backend.registry_get_chain(thread) == chain_key(conversation, chain)
                assert backend.registry_get_uuid(chain_key(conversation, chain)) == thread
                assert engine.registry.lookup(thread) == ".".join(chain)
            relayed.gate.opened.set()
            assert await payloads_collected(engine, conversation, "end", ended=True) == [
                f"<Pong><text>{text}</text></Pong>".encode()
            ]
            assert backend.registry_get_chain(conversation) is None
            assert backend.registry_get_chain(slots[1].hop_thread) is None
            assert engine.buffer.get_thread(conversation) == ()
            after = {key async for key in client.scan_iter(match=f"{prefix}*")}
            assert {key for key in after - before if _kind(key, prefix) not in ("daemon", "inbox")} == set()
    finally:
        relayed.gate.opened.set()


async def orchestrates(payload: Count | SequenceComplete | BufferComplete, metadata: HandlerMetadata) -> Any:
    """A count below 100 runs through add1, double, add1 (system.sequence); from 100, the three counts below it
    less 97 each go to add1 at once (system.buffer). What comes back goes to the client."""
    if not isinstance(payload, Count):
        return HandlerResponse.respond(payload)
    if payload.value < 100:
        steps = ["add1", "double", "add1"]
        return HandlerResponse(SequenceStart(steps=steps, payload=_xml_of(payload)), to="system.sequence")
    items = [_xml_of(Count(value)) for value in range(payload.value - 100, payload.value - 97)]
    return HandlerResponse(BufferStart(target="add1", items=items), to="system.buffer")


def _xml_of(payload: Any) -> str:
    return codec_for(type(payload)).to_bytes(payload).decode()


def _sent(count: Count) -> str:
    """A count as a client's payload: out of the envelope's (default) namespace."""
    return _xml_of(count).replace("<Count>", '<Count xmlns="">', 1)


async def test_sequences_and_buffers_run_on_durable_conversations_and_leave_nothing(redis_server: RedisServer) -> None:
    """system.sequence and system.buffer call their steps as conversations of their own (each hop stored as
    its history slot): the results come back whole, and every conversation's state goes with its end."""
    prefix = "orchestrated:"
    listeners = [
        Listener(
            "conductor",
            [Count, SequenceComplete, BufferComplete],
            orchestrates,
            peers=["system.sequence", "system.buffer"],
            ingress=True,
        ),
        Listener("add1", [Count], add_one, peers=[]),
        Listener("double", [Count], double, peers=[]),
    ]
    async with started(redis_server, prefix, listeners) as engine:
        counted = codec_for(Count)
        sequenced = await engine.accept(envelope(_sent(Count(3)), to="conductor"))
        assert isinstance(sequenced, Accepted)
        [done] = await payloads_collected(engine, sequenced.thread, "end", ended=True)
        completed = codec_for(SequenceComplete).from_bytes(done)
        assert (counted.from_bytes(completed.final_result.encode()).value, completed.step_count) == (9, 3)
        buffered = await engine.accept(envelope(_sent(Count(105)), to="conductor"))
        assert isinstance(buffered, Accepted)
        [done] = await payloads_collected(engine, buffered.thread, "end", ended=True)
        complete = codec_for(BufferComplete).from_bytes(done)
        assert complete.successful == 3
        assert [counted.from_bytes(item.result.encode()).value for item in complete.results] == [6, 7, 8]
        for _ in range(100):  # the calls' own conversations end as their answers are committed
            if not await _state_left(engine):
                break
            await asyncio.sleep(0.05)
        assert await _state_left(engine) == []
