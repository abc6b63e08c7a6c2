"""The durable engine in process, on a real redis-server: the door's edge cases."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.redis_server import RedisServer
from tests.support import Ping, echo, envelope, ping_xml
from xml_pipeline import ErrorCode
from xml_pipeline.cluster.engine import Accepted, DurableEngine, DurableSettings, Refused
from xml_pipeline.cluster.store import ClusterStore
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.organism import Listener, Organism

ALICE = ClientAccess.authenticated("alice", frozenset({"echo"}))


@pytest.fixture
async def engine(redis_server: RedisServer) -> AsyncIterator[DurableEngine]:
    backend = RedisBackend(redis_server.url, prefix="door-edges:", fail_fast_seconds=None)
    organism = Organism.of("edges", [Listener("echo", [Ping], echo, peers=[], ingress=True)])
    durable = DurableEngine(organism, backend, DurableSettings(reply_retention_seconds=30))
    await durable.start()
    try:
        yield durable
    finally:
        await durable.stop(drain_timeout=5)
        client = redis.Redis.from_url(redis_server.url)
        for key in client.scan_iter(match="door-edges:*"):
            client.unlink(key)
        client.close()
        backend.close()


async def test_opening_a_conversation_twice_stores_it_once(engine: DurableEngine) -> None:
    """A retried opening (its answer lost on the way back) must not store the message a second time."""
    store: ClusterStore = engine.store
    listener = engine.listeners["echo"]
    hop, effects = engine._router.opening("console", listener, Ping("once"), b"<Ping><text>once</text></Ping>")
    for _ in range(2):
        await store.commit(hop.conversation, effects, opening=("console", "echo", -1), retention=30)
    assert await store.client.xlen(store.keys.stream("echo")) <= 1  # the first may already be handled
    collected = await engine.collect(hop.conversation, "end", 10)
    assert collected is not None
    assert [reply.payload_xml for reply in collected.replies] == [b"<Pong><text>once</text></Pong>"]


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
    backend = RedisBackend(redis_server.url, prefix="gone-consumers:", fail_fast_seconds=None)
    organism = Organism.of("gone", [Listener("echo", [Ping], echo, peers=[], ingress=True)])
    settings = DurableSettings(reply_retention_seconds=30, forget_consumers_after_seconds=0)
    durable = DurableEngine(organism, backend, settings)
    client = redis.Redis.from_url(redis_server.url)
    stream = durable.store.keys.stream("echo")
    try:
        await durable.start()
        for ghost in ("ghost-1", "ghost-2"):  # daemons that joined once and were never seen again
            assert client.xgroup_createconsumer(stream, "xml-pipeline", ghost) == 1
        await durable._forget_gone_consumers()  # the reclaimer does this now and then
        names = {c["name"].decode() for c in client.xinfo_consumers(stream, "xml-pipeline")}
        assert not names & {"ghost-1", "ghost-2"}
        assert names <= {durable.daemon_id}
    finally:
        await durable.stop(drain_timeout=5)
        for key in client.scan_iter(match="gone-consumers:*"):
            client.unlink(key)
        client.close()
        backend.close()
