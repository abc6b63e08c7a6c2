"""The reference design's backend calls, exactly as its users write them, on memory, manager and Redis."""

from __future__ import annotations

import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor

import pytest
import redis

from tests import reference_workers
from tests.conftest import ROOT
from tests.redis_server import RedisServer
from xml_pipeline.config.loader import load_organism_text
from xml_pipeline.memory.factory import open_backend
from xml_pipeline.memory.manager_backend import ManagerBackend
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import (
    BackendConfig,
    SharedBackend,
    get_shared_backend,
    reset_shared_backend,
)

EVERY_BYTE = bytes(range(256))


def test_buffer_calls_without_caps(backend: SharedBackend) -> None:
    assert backend.buffer_append("t1", b"a") == 0
    assert backend.buffer_append("t1", EVERY_BYTE) == 1
    assert backend.buffer_append("t2", b"\x00\xff") == 0
    assert backend.buffer_get_thread("t1") == [b"a", EVERY_BYTE]
    assert backend.buffer_get_slot("t1", 1) == EVERY_BYTE
    assert backend.buffer_get_slot("t1", 2) is None
    assert backend.buffer_thread_len("t1") == 2
    assert backend.buffer_thread_exists("t2") is True
    assert sorted(backend.buffer_list_threads()) == ["t1", "t2"]
    assert backend.buffer_delete_thread("t2") is True
    assert backend.buffer_delete_thread("t2") is False
    backend.buffer_clear()
    assert (backend.buffer_list_threads(), backend.buffer_thread_exists("t1")) == ([], False)


def test_uncapped_appends_go_past_what_a_cap_would_refuse(backend: SharedBackend) -> None:
    for thread in ("t1", "t2", "t3"):
        backend.buffer_append(thread, b"x", max_slots=1)
    assert [backend.buffer_append("t1", b"y", max_threads=3) for _ in range(3)] == [1, 2, 3]


def test_registry_calls_map_both_ways(backend: SharedBackend) -> None:
    backend.registry_set("console.router", "u1")
    backend.registry_set("console.router.greeter", "u2")
    assert backend.registry_get_uuid("console.router") == "u1"
    assert backend.registry_get_chain("u2") == "console.router.greeter"
    assert backend.registry_list_all() == {"u1": "console.router", "u2": "console.router.greeter"}
    assert backend.registry_delete("u1") is True
    assert (backend.registry_get_chain("u1"), backend.registry_get_uuid("console.router")) == (None, None)
    assert backend.registry_delete("u1") is False
    backend.registry_clear()
    assert backend.registry_list_all() == {}


def test_ping_and_info_count_threads_and_entries(backend: SharedBackend) -> None:
    backend.buffer_append("t1", b"a")
    backend.buffer_append("t1", b"b")
    backend.buffer_append("t2", b"a")
    backend.registry_set("a.b", "u1")
    info = backend.info()
    assert backend.ping() is True
    assert (info["buffer_threads"], info["registry_entries"]) == (2, 1)
    if isinstance(backend, RedisBackend):
        assert info["ttl_seconds"] == backend.ttl
    backend.buffer_clear()
    backend.registry_clear()


def test_manager_backend_starts_and_owns_its_server() -> None:
    backend = ManagerBackend()
    try:
        assert isinstance(backend.address, str)
        assert len(backend.authkey) == 32
        assert backend.buffer_append("t", b"a") == 0
    finally:
        backend.close()
    assert backend.ping() is False


def test_a_client_by_address_shares_state_and_its_close_leaves_the_server_running() -> None:
    server = ManagerBackend()
    try:
        client = ManagerBackend(address=server.address, authkey=server.authkey)
        client.registry_set("a.b", "u1")
        client.close()
        assert server.registry_get_chain("u1") == "a.b"
        assert server.ping() is True
    finally:
        server.close()


def test_a_spawned_process_reaches_the_manager_by_address_and_authkey() -> None:
    server = ManagerBackend()
    try:
        server.buffer_append("t", b"from the parent")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
            index, chain = executor.submit(
                reference_workers.append_and_register, server.address, server.authkey, "t", EVERY_BYTE
            ).result(timeout=60)
        assert (index, chain) == (1, "spawned.chain")
        assert server.buffer_get_thread("t") == [b"from the parent", EVERY_BYTE]
        assert server.registry_get_uuid("spawned.chain") == "spawned-uuid"
    finally:
        server.close()


def test_a_wrong_authkey_is_refused() -> None:
    server = ManagerBackend()
    try:
        with pytest.raises(multiprocessing.AuthenticationError):
            ManagerBackend(address=server.address, authkey=b"not the key")
    finally:
        server.close()


def test_redis_ttl_zero_leaves_every_key_without_expiry(redis_server: RedisServer) -> None:
    prefix = f"p{uuid.uuid4().hex[:6]}:"
    backend = RedisBackend(redis_server.url, prefix=prefix, ttl=0)
    client = redis.Redis.from_url(redis_server.url)
    try:
        backend.buffer_append("t1", b"a")
        backend.registry_set("a.b", "u1")
        backend.record_put("buffer", "b1", "meta", b"{}")
        backend.buffer_get_thread("t1")
        backend.registry_get_chain("u1")
        backend.record_get("buffer", "b1")
        keys = backend.keys()
        assert len(keys) == 5  # the list, the thread index, both registry directions, the record
        assert {key: client.ttl(key) for key in keys} == dict.fromkeys(keys, -1)
        assert backend.info()["ttl_seconds"] == 0
        assert backend.info()["buffer_threads"] == 1
    finally:
        backend.buffer_clear()
        backend.registry_clear()
        backend.record_clear("buffer")
        backend.close()
        client.close()


def test_redis_backend_takes_the_reference_arguments(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url, "p:", 0)
    assert (backend.prefix, backend.ttl) == ("p:", 0)
    backend.close()
    assert RedisBackend().spec.url == "redis://localhost:6379"
    with pytest.raises(ValueError, match="ttl"):
        RedisBackend(redis_server.url, ttl=-1)


def test_get_shared_backend_opens_what_the_config_names_once(redis_server: RedisServer) -> None:
    reset_shared_backend()
    try:
        assert isinstance(get_shared_backend(), InMemoryBackend)
        assert get_shared_backend() is get_shared_backend(BackendConfig())
        reset_shared_backend()
        config = BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix="cfg:", redis_ttl=0)
        backend = get_shared_backend(config)
        assert isinstance(backend, RedisBackend)
        assert (backend.prefix, backend.ttl) == ("cfg:", 0)
        assert get_shared_backend() is backend
        with pytest.raises(ValueError, match="already open"):
            get_shared_backend(BackendConfig())
        reset_shared_backend()
        manager = get_shared_backend(BackendConfig(backend_type="manager"))
        assert isinstance(manager, ManagerBackend)
    finally:
        reset_shared_backend()
    assert manager.ping() is False  # reset closed the manager it had started


def test_backend_config_refuses_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="backend_type"):
        BackendConfig(backend_type="postgres")


def test_organism_yaml_backend_goes_through_the_same_config(redis_server: RedisServer) -> None:
    text = f"""
organism:
  name: ttl-zero
backend:
  type: redis
  redis_url: {redis_server.url}
  redis_prefix: "yaml:"
  redis_ttl: 0
listeners:
  - name: exclaimer
    payload_class: workers.hello.Exclaim
    handler: workers.hello.exclaim
"""
    settings = load_organism_text(text, base_dir=ROOT).settings["backend"]
    assert BackendConfig.from_settings(settings) == BackendConfig("redis", redis_server.url, "yaml:", 0)
    backend = open_backend(settings)
    assert isinstance(backend, RedisBackend)
    assert backend.ttl == 0
    backend.close()
