"""InMemoryBackend against the SharedBackend protocol."""

from __future__ import annotations

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend


def test_memory_backend_implements_the_protocol() -> None:
    assert isinstance(InMemoryBackend(), SharedBackend)


def test_registry_get_or_set_keeps_the_first_uuid() -> None:
    backend = InMemoryBackend()
    assert backend.registry_get_or_set("c/a", "u1") == "u1"
    assert backend.registry_get_or_set("c/a", "u2") == "u1"
    assert backend.registry_get_chain("u2") is None
    assert backend.registry_list_all() == {"u1": "c/a"}


def test_registry_set_replaces_and_forgets_the_old_uuid() -> None:
    backend = InMemoryBackend()
    backend.registry_set("c/a", "u1")
    backend.registry_set("c/a", "u2")
    assert backend.registry_get_uuid("c/a") == "u2"
    assert backend.registry_get_chain("u1") is None
    assert backend.registry_delete("u2") is True
    assert backend.registry_get_uuid("c/a") is None


def test_ping_info_close() -> None:
    backend = InMemoryBackend()
    backend.buffer_append("t", b"x", max_slots=5, max_threads=5)
    assert backend.ping() is True
    assert backend.info() == {"type": "memory", "threads": 0, "buffers": 1, "slots": 1}
    backend.registry_clear()
    backend.close()
    assert backend.ping() is False
