"""Every SharedBackend behaves the same: memory, manager and a real redis-server."""

from __future__ import annotations

import pytest

from xml_pipeline.memory.shared_backend import BufferFull, SharedBackend, TooManyThreads
from xml_pipeline.memory.state_ops import AppendSlot, DeleteHistory, ForgetThread, RegisterThread


def test_implements_the_protocol(backend: SharedBackend) -> None:
    assert isinstance(backend, SharedBackend)
    assert backend.ping() is True
    assert backend.info()["type"] in ("memory", "manager", "redis")


def test_registry_get_or_set_keeps_the_first_uuid(backend: SharedBackend) -> None:
    assert backend.registry_get_or_set("c/a", "u1") == "u1"
    assert backend.registry_get_or_set("c/a", "u2") == "u1"
    assert backend.registry_get_chain("u2") is None
    assert backend.registry_list_all() == {"u1": "c/a"}


def test_registry_set_replaces_and_forgets_the_old_uuid(backend: SharedBackend) -> None:
    backend.registry_set("c/a", "u1")
    backend.registry_set("c/a", "u2")
    assert backend.registry_get_uuid("c/a") == "u2"
    assert backend.registry_get_chain("u1") is None
    assert backend.registry_get_chain("u2") == "c/a"
    assert backend.registry_delete("u2") is True
    assert backend.registry_delete("u2") is False
    assert backend.registry_get_uuid("c/a") is None
    assert backend.registry_list_all() == {}


def test_deleting_a_stale_uuid_leaves_the_chains_current_one(backend: SharedBackend) -> None:
    backend.registry_set("c/a", "u1")
    backend.registry_set("c/b", "u2")
    backend.registry_clear()
    assert backend.registry_list_all() == {}


def test_buffer_appends_in_order_with_indices(backend: SharedBackend) -> None:
    assert [backend.buffer_append("t", bytes([i]), max_slots=10, max_threads=10) for i in range(3)] == [0, 1, 2]
    assert backend.buffer_get_thread("t") == [b"\x00", b"\x01", b"\x02"]
    assert backend.buffer_get_slot("t", 2) == b"\x02"
    assert backend.buffer_get_slot("t", 3) is None
    assert backend.buffer_get_slot("t", -1) is None
    assert backend.buffer_get_slot("nope", 0) is None
    assert (backend.buffer_thread_len("t"), backend.buffer_thread_exists("t")) == (3, True)
    assert (backend.buffer_thread_len("nope"), backend.buffer_thread_exists("nope")) == (0, False)
    assert backend.buffer_get_thread("nope") == []


def test_buffer_caps_refuse(backend: SharedBackend) -> None:
    backend.buffer_append("t1", b"a", max_slots=1, max_threads=2)
    with pytest.raises(BufferFull):
        backend.buffer_append("t1", b"b", max_slots=1, max_threads=2)
    backend.buffer_append("t2", b"a", max_slots=1, max_threads=2)
    with pytest.raises(TooManyThreads):
        backend.buffer_append("t3", b"a", max_slots=1, max_threads=2)
    # a refused slot is not kept, nor a refused thread made
    assert (backend.buffer_get_thread("t1"), backend.buffer_thread_exists("t3")) == ([b"a"], False)
    assert backend.buffer_delete_thread("t1") is True
    backend.buffer_append("t3", b"a", max_slots=1, max_threads=2)  # room again
    assert sorted(backend.buffer_list_threads()) == ["t2", "t3"]


def test_buffer_delete_and_clear(backend: SharedBackend) -> None:
    backend.buffer_append("t1", b"a", max_slots=5, max_threads=5)
    assert backend.buffer_delete_thread("t1") is True
    assert backend.buffer_delete_thread("t1") is False
    backend.buffer_append("t2", b"a", max_slots=5, max_threads=5)
    backend.buffer_clear()
    assert backend.buffer_list_threads() == []


def test_payload_bytes_survive_exactly(backend: SharedBackend) -> None:
    every_byte = bytes(range(256))
    backend.buffer_append("t", every_byte, max_slots=5, max_threads=5)
    assert backend.buffer_get_thread("t") == [every_byte]


def test_records_hold_fields_and_refuse_overwrites_when_asked(backend: SharedBackend) -> None:
    assert backend.record_put("buffer", "b1", "meta", b"{}") is True
    assert backend.record_put("buffer", "b1", "r:0", b"first", only_if_absent=True) is True
    assert backend.record_put("buffer", "b1", "r:0", b"second", only_if_absent=True) is False
    assert backend.record_get("buffer", "b1") == {"meta": b"{}", "r:0": b"first"}
    assert backend.record_put("buffer", "b1", "meta", b"{1}") is True
    assert backend.record_get("buffer", "b1")["meta"] == b"{1}"
    backend.record_put("buffer", "b2", "meta", b"{}")
    backend.record_put("sequence", "s1", "meta", b"{}")
    assert sorted(backend.record_list("buffer")) == ["b1", "b2"]
    assert backend.record_delete("buffer", "b1") is True
    assert backend.record_delete("buffer", "b1") is False
    assert backend.record_get("buffer", "b1") == {}
    backend.record_clear("buffer")
    assert backend.record_list("buffer") == []
    assert backend.record_list("sequence") == ["s1"]
    backend.record_clear("sequence")


def test_apply_runs_writes_in_order_and_hands_back_each_outcome(backend: SharedBackend) -> None:
    ops = [
        RegisterThread("c/a", "u1"),
        AppendSlot("t1", b"<one/>", 2, 10),
        AppendSlot("t1", b"<two/>", 2, 10),
        AppendSlot("t1", b"<three/>", 2, 10),  # over the cap: refused, and the ops after it still run
        AppendSlot("t2", b"<other/>", 2, 10),
        ForgetThread("u1"),
        ForgetThread("u1"),
        DeleteHistory("t2"),
    ]
    outcomes = backend.apply(ops)
    assert outcomes[:3] == [None, 0, 1]
    assert isinstance(outcomes[3], BufferFull)
    assert outcomes[4:] == [0, True, False, True]
    assert backend.buffer_get_thread("t1") == [b"<one/>", b"<two/>"]
    assert backend.buffer_thread_exists("t2") is False
    assert backend.registry_list_all() == {}


def test_apply_refuses_a_thread_past_the_thread_cap(backend: SharedBackend) -> None:
    outcomes = backend.apply([AppendSlot("t1", b"<a/>", 5, 1), AppendSlot("t2", b"<b/>", 5, 1)])
    assert outcomes[0] == 0
    assert isinstance(outcomes[1], TooManyThreads)


def test_apply_registers_a_chain_again_as_registry_set_does(backend: SharedBackend) -> None:
    outcomes = backend.apply(
        [RegisterThread("c/a", "u1"), RegisterThread("c/a", "u2"), ForgetThread("u1"), RegisterThread("c/b", "u3")]
    )
    assert outcomes == [None, None, False, None]
    assert backend.registry_get_uuid("c/a") == "u2"
    assert backend.registry_get_chain("u1") is None
    assert backend.registry_list_all() == {"u2": "c/a", "u3": "c/b"}
    assert backend.registry_delete("u2")  # forgetting the chain's own thread forgets the chain
    assert (backend.registry_get_uuid("c/a"), backend.registry_list_all()) == (None, {"u3": "c/b"})
