"""What only Redis has: TTLs, prefixes, SCAN not KEYS, passwords, reconnects."""

from __future__ import annotations

import uuid

import msgpack
import pytest
import redis

from tests.redis_server import RedisServer
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import BackendUnavailable
from xml_pipeline.memory.state_ops import AppendSlot, ForgetThread, RegisterThread
from xml_pipeline.message_bus.thread_registry import ThreadRegistry


def raw_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def test_every_key_carries_the_ttl_and_use_refreshes_it(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, prefix="ttl-test:", ttl=100)
    client = raw_client(redis_server)
    registry = ThreadRegistry(backend)
    _, thread = registry.start_conversation("console", "greeter")
    ContextBuffer(backend).append(thread, from_id="a", to_id="b", payload_type="x:y", payload_xml=b"<y/>")
    keys = backend.keys()
    assert keys, "nothing was written"
    assert all(0 < client.ttl(key) <= 100 for key in keys)
    for key in keys:
        client.expire(key, 5)
    registry.lookup(thread)  # reading refreshes
    ContextBuffer(backend).get_thread(thread)
    assert client.ttl(f"ttl-test:reg:u:{thread}") > 5
    assert client.ttl(f"ttl-test:buf:{thread}") > 5
    backend.buffer_clear()
    backend.registry_clear()
    assert backend.keys() == []


def test_prefixes_isolate_organisms_sharing_a_server(redis_server: RedisServer) -> None:
    first = RedisBackend(redis_server.url, prefix="org-a:")
    second = RedisBackend(redis_server.url, prefix="org-b:")
    first.registry_set("c/x", "u1")
    first.buffer_append("t", b"a", max_slots=5, max_threads=5)
    assert second.registry_list_all() == {}
    assert second.buffer_list_threads() == []
    second.registry_clear()
    second.buffer_clear()
    assert first.registry_list_all() == {"u1": "c/x"}
    first.registry_clear()
    first.buffer_clear()
    assert first.keys() == []


def test_listing_and_clearing_never_use_keys(redis_server: RedisServer) -> None:
    client = raw_client(redis_server)
    client.config_resetstat()
    backend = RedisBackend(redis_server.url, prefix=f"scan-{uuid.uuid4().hex[:6]}:")
    for index in range(1200):
        backend.registry_set(f"c/{index}", f"u{index}")
    assert len(backend.registry_list_all()) == 1200
    backend.registry_clear()
    assert backend.registry_list_all() == {}
    stats = client.info("commandstats")
    assert "cmdstat_keys" not in stats
    assert stats["cmdstat_scan"]["calls"] > 0


def test_url_with_password(tmp_path: object) -> None:
    server = RedisServer(password="s3cret!")
    server.start()
    try:
        backend = RedisBackend(server.url, prefix="pw:")
        assert backend.registry_get_or_set("c/a", "u1") == "u1"
        wrong = RedisBackend(server.url.replace("s3cret!", "wrong"), prefix="pw:", retries=0)
        with pytest.raises(BackendUnavailable):
            wrong.registry_get_uuid("c/a")
        assert wrong.ping() is False
    finally:
        server.close()


def test_unreachable_server_is_backend_unavailable_and_reconnects_when_back() -> None:
    server = RedisServer()
    server.start()
    backend = RedisBackend(server.url, prefix="gone:", retries=1, socket_timeout=0.5)
    try:
        backend.registry_set("c/a", "u1")
        server.stop()
        with pytest.raises(BackendUnavailable, match="unreachable"):
            backend.registry_get_uuid("c/a")
        assert backend.ping() is False
        server.start()  # same port, empty (no persistence)
        assert backend.ping() is True
        assert backend.registry_get_or_set("c/a", "u2") == "u2"
    finally:
        backend.close()
        server.close()


def test_tls_url_verifies_the_server_certificate() -> None:
    server = RedisServer(password="tls-pass", tls=True)
    server.start()
    try:
        assert server.url.startswith("rediss://")
        backend = RedisBackend(server.url, prefix="tls:")
        assert backend.registry_get_or_set("c/a", "u1") == "u1"
        untrusting = RedisBackend(server.url.split("?")[0], prefix="tls:", retries=0)  # no CA: must refuse
        assert untrusting.ping() is False
        backend.close()
        untrusting.close()
    finally:
        server.close()


def test_a_batch_survives_the_server_forgetting_its_scripts(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, prefix=f"noscript-{uuid.uuid4().hex[:8]}:")
    assert backend.apply([AppendSlot("t", b"<a/>", 10, 10)]) == [0]
    raw_client(redis_server).script_flush()  # as after a restart: every cached script is gone
    outcomes = backend.apply([RegisterThread("c/a", "u1"), AppendSlot("t", b"<b/>", 10, 10), ForgetThread("u1")])
    assert outcomes == [None, 1, True]
    assert backend.buffer_get_thread("t") == [b"<a/>", b"<b/>"]  # each op ran exactly once


def test_each_slot_of_a_batch_is_an_argument_of_its_own_and_lands_in_order(redis_server: RedisServer) -> None:
    """Inside the MessagePack array a slot's bytes would be hashed twice by Redis's Lua (as the array's
    argument and as the string unpacked from it): the array names each slot by its argument's number."""
    backend = RedisBackend(redis_server.url, prefix=f"slots-{uuid.uuid4().hex[:8]}:")
    ops = [AppendSlot("t", b"<a/>", 10, 10), RegisterThread("c/a", "u1"), AppendSlot("t", b"<b/>", 10, 10)]
    args = backend._apply_args(ops)
    assert args[3:] == [b"<a/>", b"<b/>"]
    assert msgpack.unpackb(args[2], raw=True)[:3] == [b"a", b"t", 1]
    assert backend.apply(ops) == [0, None, 1]
    assert backend.buffer_get_thread("t") == [b"<a/>", b"<b/>"]


def test_a_prefix_with_glob_characters_touches_only_its_own_keys(redis_server: RedisServer) -> None:
    """A prefix is matched literally: 'a*' must not list or clear another organism's 'app1:' keys."""
    victim = RedisBackend(redis_server.url, prefix="app1:")
    globbing = RedisBackend(redis_server.url, prefix="a*")
    try:
        victim.buffer_append("t-victim", b"slot")
        victim.registry_set("victim.chain", "u-victim")
        victim.record_put("buffer", "r-victim", "field", b"value")
        assert globbing.buffer_list_threads() == []
        assert globbing.registry_list_all() == {}
        globbing.buffer_clear()
        globbing.registry_clear()
        globbing.record_clear("buffer")
        assert victim.buffer_get_thread("t-victim") == [b"slot"]
        assert victim.registry_get_chain("u-victim") is not None
        assert victim.record_get("buffer", "r-victim") == {"field": b"value"}
    finally:
        victim.buffer_clear()
        victim.registry_clear()
        victim.record_clear("buffer")
        victim.close()
        globbing.close()


def test_a_prefix_without_durable_conversations_writes_threads_without_looking_for_them(
    redis_server: RedisServer,
) -> None:
    """Registering and forgetting threads (the at-most-once pump's every message) asks no conversation hash
    under a prefix the durable engine never marked: each such look is a call in the batch script, two per
    registration and forgetting, and none could find anything there."""
    prefix = f"plain-{uuid.uuid4().hex[:6]}:"
    backend = RedisBackend(redis_server.url, prefix=prefix, ttl=100)
    client = raw_client(redis_server)
    conversation, thread = str(uuid.uuid4()), str(uuid.uuid4())
    client.config_resetstat()
    backend.apply(
        [
            RegisterThread(f"{conversation}/console", conversation),
            RegisterThread(f"{conversation}/console/greeter", thread),
        ]
    )
    backend.apply([ForgetThread(thread), ForgetThread(conversation)])
    stats = client.info("commandstats")
    assert not {"cmdstat_hget", "cmdstat_hmget"} & set(stats)
    assert backend.keys() == []
    client.set(f"{prefix}durable", "1")  # as the durable engine marks its prefix: then it looks
    client.config_resetstat()
    backend.apply([RegisterThread(f"{conversation}/console", conversation)])
    assert "cmdstat_hmget" in client.info("commandstats")
    backend.registry_clear()
    client.unlink(f"{prefix}durable")
