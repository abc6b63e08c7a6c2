"""ThreadRegistry's own conversation-scoped API: opaque UUIDs for call chains, per conversation, on every backend.

The reference design's dotted API is tested in test_thread_registry_reference.py.
"""

from __future__ import annotations

import uuid

import pytest

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message_bus import thread_registry
from xml_pipeline.message_bus.thread_registry import (
    Pruned,
    ThreadRegistry,
    get_registry,
    reset_registry,
    set_registry,
)


def test_start_conversation_gives_every_conversation_its_own_threads(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend)
    first = registry.start_conversation("console", "greeter")
    second = registry.start_conversation("console", "greeter")
    assert len({*first, *second}) == 4
    for value in (*first, *second):
        assert str(uuid.UUID(value)) == value
    assert registry.lookup(first[1]) == registry.lookup(second[1]) == "console.greeter"


def test_extend_then_prune_walks_the_chain_back(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend)
    root, at_router = registry.start_conversation("console", "router")
    at_greeter = registry.extend_chain(at_router, "greeter")
    assert registry.lookup(at_greeter) == "console.router.greeter"
    assert registry.prune_for_response(at_greeter) == Pruned("router", at_router)
    assert registry.prune_for_response(at_router) == Pruned("console", root)
    assert registry.prune_for_response(root) == (None, None)
    assert registry.lookup(root) is None  # the one-segment root was cleaned up


def test_extending_the_same_chain_twice_in_a_conversation_reuses_the_thread(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend)
    _, thread = registry.start_conversation("console", "router")
    assert registry.extend_chain(thread, "greeter") == registry.extend_chain(thread, "greeter")


def test_dotted_listener_names_stay_single_segments(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend)
    root, thread = registry.start_conversation("console", "system.buffer")
    deeper = registry.extend_chain(thread, "team.alpha")
    record = registry.lookup_record(deeper)
    assert record is not None
    assert record.chain == ("console", "system.buffer", "team.alpha")
    assert registry.prune_for_response(deeper) == Pruned("system.buffer", thread)
    assert registry.prune_for_response(thread) == Pruned("console", root)


def test_get_or_create_within_a_conversation_and_chains_as_sequences(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend)
    conversation, _ = registry.start_conversation("console", "greeter")
    thread = registry.get_or_create(["console", "greeter", "shouter"], conversation)
    assert registry.get_or_create("console.greeter.shouter", conversation) == thread
    assert registry.get_or_create("console.greeter.shouter") != thread  # the shared namespace is another one
    record = registry.lookup_record(thread)
    assert record is not None
    assert (record.conversation, record.chain) == (conversation, ("console", "greeter", "shouter"))
    with pytest.raises(ValueError, match="not a valid chain"):
        registry.get_or_create("console..greeter")
    with pytest.raises(ValueError, match="not a valid chain"):
        registry.get_or_create(["console", "a/b"])


def test_cleanup_debug_dump_and_clear(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend)
    conversation, thread = registry.start_conversation("remote", "here")
    assert registry.debug_dump() == {conversation: "remote", thread: "remote.here"}
    assert registry.cleanup(thread) is True
    assert registry.cleanup(thread) is False
    assert registry.lookup(thread) is None
    assert len(registry) == 1
    registry.clear()
    assert (len(registry), registry.root_uuid) == (0, None)
    with pytest.raises(KeyError):
        registry.extend_chain(thread, "x")


def test_module_level_registry_is_a_resettable_singleton() -> None:
    reset_registry()
    first = get_registry()
    assert get_registry() is first
    reset_registry()
    assert get_registry() is not first
    assert thread_registry.ThreadRegistry is ThreadRegistry


def test_thread_ids_are_random_version_4_uuids() -> None:
    from xml_pipeline.message_bus.thread_registry import new_thread_id

    ids = {new_thread_id() for _ in range(1000)}
    assert len(ids) == 1000
    for value in list(ids)[:50]:
        parsed = uuid.UUID(value)
        assert (str(parsed), parsed.version, parsed.variant) == (value, 4, uuid.RFC_4122)


def test_the_process_wide_registry_is_made_once_installed_by_set_and_forgotten_by_reset() -> None:
    reset_registry()
    made = get_registry()
    assert get_registry() is made
    installed = ThreadRegistry(InMemoryBackend())
    set_registry(installed)
    assert get_registry() is installed
    reset_registry()
    assert get_registry() is not installed
    reset_registry()
