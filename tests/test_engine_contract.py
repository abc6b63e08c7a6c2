"""Both engines keep one contract at the client's door: accept, refuse, collect (message_bus/engine.py).

The daemon and its HTTP doors talk to :class:`Engine` only, so what a client
sees must not depend on the engine behind it. Each test runs against the
in-process engine (no Redis) and the durable one (a real redis-server).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.durable_support import started
from tests.redis_server import RedisServer
from tests.support import Ping, Pong, echo, envelope, forwarder, ping_xml
from xml_pipeline import ErrorCode
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.engine import Accepted, Engine, Refused
from xml_pipeline.message_bus.in_process import InProcessEngine
from xml_pipeline.organism import Listener, Organism

ALICE = ClientAccess.authenticated("alice", frozenset({"echo", "relay"}))


def contract_organism() -> Organism:
    return Organism.of(
        "contract",
        [
            Listener("echo", [Ping], echo, peers=[], ingress=True),
            Listener("relay", [Ping, Pong], forwarder("echo"), ingress=True),
        ],
    )


@pytest.fixture(params=["in-process", "durable"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    if request.param == "in-process":
        local: Engine = InProcessEngine(contract_organism(), reply_retention_seconds=30, collect_grace_seconds=0)
        await local.start()
        try:
            yield local
        finally:
            await local.stop(drain_timeout=5)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    listeners = list(contract_organism().listeners.values())
    async with started(server, f"contract-{uuid.uuid4().hex[:8]}:", listeners) as durable:
        yield durable


async def accepted(engine: Engine, raw: bytes, access: ClientAccess = ALICE) -> str:
    outcome = await engine.accept(raw, access=access)
    assert isinstance(outcome, Accepted), outcome
    return outcome.thread


async def test_an_accepted_message_has_its_replies_collected_until_the_end(engine: Engine) -> None:
    thread = await accepted(engine, envelope(ping_xml("hello"), sender="alice", to="relay"))
    collected = await engine.collect(thread, "end", 10, owner="alice")
    assert collected is not None
    assert collected.ended
    assert len(collected.replies) == 1
    assert b"<Pong><text>hello</text></Pong>" in collected.replies[0].envelope
    assert b"<xp:to>alice</xp:to>" in collected.replies[0].envelope


async def test_everything_collected_after_the_end_leaves_nothing_to_collect(engine: Engine) -> None:
    thread = await accepted(engine, envelope(ping_xml(), sender="alice"))
    first = await engine.collect(thread, "end", 10, owner="alice")
    assert first is not None
    assert first.ended
    assert await engine.collect(thread, "none", 0, owner="alice") is None


async def test_first_returns_at_the_first_reply_and_none_never_waits(engine: Engine) -> None:
    thread = await accepted(engine, envelope(ping_xml("soon"), sender="alice"))
    started = time.monotonic()
    looked = await engine.collect(thread, "none", 30, owner="alice")
    assert looked is not None
    assert time.monotonic() - started < 5
    if looked.ended:  # it was that quick: everything was handed over, and the conversation is forgotten
        assert len(looked.replies) == 1
        assert await engine.collect(thread, "first", 0.2, owner="alice") is None
        return
    collected = await engine.collect(thread, "first", 10, owner="alice")
    assert collected is not None
    assert len(looked.replies) + len(collected.replies) == 1


async def test_only_the_client_that_sent_a_message_may_collect_its_replies(engine: Engine) -> None:
    thread = await accepted(engine, envelope(ping_xml("mine"), sender="alice"))
    assert await engine.collect(thread, "end", 0.5, owner="bob") is None
    collected = await engine.collect(thread, "end", 10, owner="alice")
    assert collected is not None
    assert len(collected.replies) == 1


async def test_a_client_without_identity_may_not_collect_an_identified_clients_replies(engine: Engine) -> None:
    thread = await accepted(engine, envelope(ping_xml("mine"), sender="alice"))
    assert await engine.collect(thread, "end", 10) is None


async def test_an_unknown_thread_has_nothing_to_collect(engine: Engine) -> None:
    assert await engine.collect(str(uuid.uuid4()), "first", 0.2) is None


async def test_a_wait_on_an_unknown_thread_is_answered_at_once_not_after_its_timeout(engine: Engine) -> None:
    async with asyncio.timeout(5):  # far less than the 60 s asked for
        assert await engine.collect(str(uuid.uuid4()), "end", 60) is None


async def test_a_message_the_admission_refuses_is_answered_with_its_system_error(engine: Engine) -> None:
    outcome = await engine.accept(envelope(ping_xml(), sender="alice", to="nobody"), access=ALICE)
    assert isinstance(outcome, Refused)
    assert outcome.code is ErrorCode.UNKNOWN_TARGET
    assert "nobody" in outcome.detail
    assert b"unknown-target" in outcome.envelope
    assert await engine.collect(outcome.thread, "none", 0, owner="alice") is None


async def test_a_client_may_not_send_as_someone_else(engine: Engine) -> None:
    outcome = await engine.accept(envelope(ping_xml(), sender="mallory"), access=ALICE)
    assert isinstance(outcome, Refused)
    assert outcome.code is ErrorCode.SENDER_FORBIDDEN


async def test_the_door_refuses_what_it_could_not_read_the_same_way(engine: Engine) -> None:
    refused = engine.refuse(ErrorCode.TOO_LARGE, "the body is 9 bytes; the limit is 8")
    assert (refused.code, refused.detail) == (ErrorCode.TOO_LARGE, "the body is 9 bytes; the limit is 8")
    assert refused.thread
    assert b"too-large" in refused.envelope


async def test_a_stopped_engine_refuses_as_shutting_down(engine: Engine) -> None:
    assert engine.healthy
    assert engine.stats().accepting
    await engine.stop(drain_timeout=5)
    outcome = await engine.accept(envelope(ping_xml(), sender="alice"), access=ALICE)
    assert isinstance(outcome, Refused)
    assert outcome.code is ErrorCode.SHUTTING_DOWN


async def test_the_in_process_engine_counts_the_replies_it_keeps_for_status() -> None:
    engine = InProcessEngine(contract_organism(), reply_retention_seconds=30, collect_grace_seconds=0)
    await engine.start()
    try:
        thread = await accepted(engine, envelope(ping_xml("kept"), sender="alice"))
        for _ in range(100):
            if engine.stats().uncollected_replies:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()
        assert (stats.uncollected_replies, stats.uncollected_reply_bytes > 0) == (1, True)
        await engine.collect(thread, "end", 10, owner="alice")
        stats = engine.stats()
        assert (stats.uncollected_replies, stats.uncollected_reply_bytes) == (0, 0)
    finally:
        await engine.stop(drain_timeout=5)
