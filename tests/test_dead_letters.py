"""The dead-letter stream as operators handle it: list, replay, purge (real redis-server)."""

from __future__ import annotations

import asyncio

import redis

from tests.durable_support import started
from tests.redis_server import RedisServer
from tests.support import Ping, Pong, envelope, ping_xml
from xml_pipeline.cluster.dead_letters import DeadLetters
from xml_pipeline.cluster.engine import DurableSettings
from xml_pipeline.cluster.hop import Hop
from xml_pipeline.cluster.store import Keys
from xml_pipeline.handler import HandlerMetadata, HandlerResponse
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.engine import Accepted
from xml_pipeline.organism import Listener

HOP = Hop(
    "conv-1", ("console", "worker"), ("conv-1", "t-1"), "console", "tests.support:Ping", b"<Ping><text>x</text></Ping>"
)


def _letter(server: RedisServer, prefix: str) -> str:
    client = redis.Redis.from_url(server.url)
    try:
        fields = [*HOP.fields(), "listener", "worker", "deliveries", "3", "failed_at", "1733011200.5"]
        entry = client.xadd(Keys(prefix).dead_letters, dict(zip(fields[::2], fields[1::2], strict=True)))
        return entry.decode()
    finally:
        client.close()


def test_list_replay_and_purge(redis_server: RedisServer) -> None:
    prefix = "dl-ops:"
    letters = DeadLetters(redis_server.url, prefix)
    client = redis.Redis.from_url(redis_server.url)
    try:
        first = _letter(redis_server, prefix)
        [listed] = letters.list()
        assert (listed.entry_id, listed.listener, listed.deliveries, listed.hop) == (first, "worker", 3, HOP)

        replayed = letters.replay(first)
        assert replayed is not None
        [(_, fields)] = client.xrange(Keys(prefix).stream("worker"))
        assert Hop.from_fields(fields) == HOP  # back in its listener's stream as it was
        assert client.hget(Keys(prefix).conversation("conv-1"), "pending") == b"1"
        assert client.ttl(Keys(prefix).conversation("conv-1")) == -1  # live again: it lasts until its end
        assert letters.list() == []
        assert letters.replay(first) is None  # gone: nothing replays twice

        _letter(redis_server, prefix)
        _letter(redis_server, prefix)
        assert letters.purge() == 2
        assert letters.list() == []
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.unlink(key)
        client.close()
        letters.close()


async def test_a_replayed_dead_letter_keeps_its_conversations_owner(redis_server: RedisServer) -> None:
    """A hop replayed after its conversation ended (and after its replies' owner expired) is still the owner's.

    The dead letter's conversation ends (its client gets ``dead-letter``), is
    collected, and its owner expires with the replies. The operator replays
    the hop: the conversation lives again, and its replies must be readable by
    its owner alone, not by a client without a token.
    """
    entered, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def stuck_once(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await release.wait()
        return HandlerResponse.respond(Pong(payload.text))

    prefix = "dl-owner:"
    alice = ClientAccess.authenticated("alice", frozenset({"echo"}))
    settings = DurableSettings(reply_retention_seconds=3)
    listener = Listener("echo", [Ping], stuck_once, peers=[], ingress=True)
    letters = DeadLetters(redis_server.url, prefix)
    try:
        async with started(redis_server, prefix, [listener], settings=settings) as engine:
            accepted = await engine.accept(envelope(ping_xml("lost"), sender="alice"), access=alice)
            assert isinstance(accepted, Accepted)
            await asyncio.wait_for(entered.wait(), 10)
            client = engine.store.client
            [(entry_id, fields)] = await client.xrange(engine.store.keys.stream("echo"))
            await engine._dead_letter("echo", entry_id, Hop.from_fields(fields), 3)  # as after 3 crashes
            release.set()
            failed = await engine.collect(accepted.thread, "end", 10, owner="alice")
            assert failed is not None
            assert failed.ended
            owner_key = f"{prefix}r-owner:{accepted.thread}"
            for _ in range(200):  # its retention passes (3 s; at most 10 s here)
                if not await client.exists(owner_key):
                    break
                await asyncio.sleep(0.05)
            assert not await client.exists(owner_key)

            [letter] = letters.list()
            assert letters.replay(letter.entry_id) is not None
            assert await engine.collect(accepted.thread, "end", 10) is None  # not a tokenless client's
            collected = await engine.collect(accepted.thread, "end", 10, owner="alice")
            assert collected is not None
            assert collected.ended
            assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>lost</text></Pong>"]
    finally:
        letters.close()


async def test_a_hop_claimed_then_dead_lettered_is_listed_and_replayed_as_its_payload_alone(
    redis_server: RedisServer,
) -> None:
    """A hop's stream entry holds its history slot (its header says where the payload starts). Taken by a daemon
    that went silent and claimed past max_deliveries, it is dead-lettered: the letter must hold the payload
    alone, as listed and as replayed, and the replayed hop is answered on its thread."""
    prefix = "dl-claimed:"
    listeners = [Listener("echo", [Ping], _echo, peers=[], ingress=True, timeout_seconds=0.2)]
    door_only = DurableSettings(reply_retention_seconds=30, serve=frozenset())
    letters = DeadLetters(redis_server.url, prefix)
    try:
        async with started(redis_server, prefix, listeners, settings=door_only) as door:
            accepted = await door.accept(envelope(ping_xml("two\nlines")))
            assert isinstance(accepted, Accepted)
            await door.store.read("silent-daemon", {"echo": 1}, 100)  # taken, never committed
            settings = DurableSettings(
                reply_retention_seconds=30, claim_grace_seconds=0.1, lease_seconds=0.2, max_deliveries=1
            )
            async with started(redis_server, prefix, listeners, settings=settings):
                failed = await door.collect(accepted.thread, "end", 10)
                assert failed is not None
                assert failed.ended
                [error] = failed.replies
                assert b"dead-letter" in error.envelope
                [letter] = letters.list()
                assert (letter.listener, letter.deliveries) == ("echo", 1)
                assert letter.hop.payload_xml == ping_xml("two\nlines").encode()
                assert letter.hop.conversation == accepted.thread
                assert letters.replay(letter.entry_id) is not None
                answered = await door.collect(accepted.thread, "end", 10)
                assert answered is not None
                assert answered.ended
                assert [reply.payload_xml for reply in answered.replies] == [b"<Pong><text>two\nlines</text></Pong>"]
                assert letters.list() == []
    finally:
        letters.close()


async def _echo(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Pong(payload.text))
