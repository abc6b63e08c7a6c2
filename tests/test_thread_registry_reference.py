"""The reference design's ThreadRegistry calls, exactly as its users write them, on memory, manager and Redis."""

from __future__ import annotations

import asyncio
import uuid

from tests.support import Ping, Pong
from xml_pipeline import HandlerMetadata, HandlerResponse
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message_bus.thread_registry import (
    ThreadRegistry,
    get_registry,
    reset_registry,
)
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.testing import running


def test_is_shared_exactly_when_a_backend_was_passed(backend: SharedBackend) -> None:
    assert ThreadRegistry().is_shared is False
    assert ThreadRegistry(backend=InMemoryBackend()).is_shared is True
    assert ThreadRegistry(backend=backend).is_shared is True


def test_root_before_and_after_initialize_root(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    assert (registry.root_uuid, registry.root_chain) == (None, "system")
    root = registry.initialize_root()
    assert registry.initialize_root() == root
    assert registry.initialize_root(organism_name="other") == root
    assert registry.root_chain == "system.organism"
    assert registry.lookup(root) == "system.organism"
    assert ThreadRegistry(backend=backend).initialize_root(organism_name="organism") == root


def test_the_same_dotted_chain_always_gives_the_same_uuid(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    thread = registry.get_or_create("a.b")
    assert str(uuid.UUID(thread)) == thread
    assert registry.get_or_create("a.b") == thread
    registry.initialize_root("hello")
    assert registry.get_or_create("a.b") == thread
    assert ThreadRegistry(backend=backend).get_or_create("a.b") == thread
    assert registry.lookup(thread) == "a.b"
    assert registry.get_or_create("a.c") != thread
    assert registry.lookup(str(uuid.uuid4())) is None


def test_extend_then_prune_walk_the_chain_back(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    at_router = registry.start_chain("console", "router")
    assert at_router == registry.get_or_create("console.router")
    at_greeter = registry.extend_chain(at_router, "greeter")
    assert at_greeter == registry.get_or_create("console.router.greeter")
    caller, thread = registry.prune_for_response(at_greeter)
    assert (caller, thread) == ("router", at_router)
    assert registry.prune_for_response(at_router) == ("console", registry.get_or_create("console"))


def test_prune_makes_the_callers_thread_if_it_has_none(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    deep = registry.get_or_create("a.b.c")
    caller, thread = registry.prune_for_response(deep)
    assert caller == "b"
    assert thread is not None
    assert registry.lookup(thread) == "a.b"


def test_prune_gives_none_none_for_one_segment_chains_and_cleans_them_up(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    lone = registry.get_or_create("console")
    assert registry.prune_for_response(lone) == (None, None)
    assert registry.lookup(lone) is None
    assert registry.prune_for_response(str(uuid.uuid4())) == (None, None)


def test_register_thread_binds_an_outside_uuid(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    outside = str(uuid.uuid4())
    assert registry.register_thread(outside, "console", "greeter") == outside
    assert registry.lookup(outside) == "console.greeter"
    assert registry.get_or_create("console.greeter") == outside
    assert registry.register_thread(str(uuid.uuid4()), "console", "greeter") == outside  # the chain's own UUID
    registry.initialize_root("hello")
    rooted = str(uuid.uuid4())
    assert registry.register_thread(rooted, "console", "greeter") == rooted
    assert registry.lookup(rooted) == "system.hello.console.greeter"
    assert registry.register_thread(rooted, "someone", "else") == rooted  # already registered: kept as it is
    assert registry.lookup(rooted) == "system.hello.console.greeter"


def test_cleanup_debug_dump_and_clear(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    root = registry.initialize_root()
    thread = registry.start_chain("console", "greeter")
    assert registry.debug_dump() == {root: "system.organism", thread: "console.greeter"}
    registry.cleanup(thread)
    assert registry.lookup(thread) is None
    assert registry.get_or_create("console.greeter") != thread
    registry.clear()
    assert (registry.debug_dump(), registry.root_uuid, registry.root_chain) == ({}, None, "system")


def test_names_with_dots_stay_whole_when_passed_as_names(backend: SharedBackend) -> None:
    registry = ThreadRegistry(backend=backend)
    at_buffer = registry.start_chain("console", "system.buffer")
    at_alpha = registry.extend_chain(at_buffer, "team.alpha")
    assert registry.prune_for_response(at_alpha) == ("system.buffer", at_buffer)
    record = registry.lookup_record(at_alpha)
    assert record is not None
    assert record.chain == ("console", "system.buffer", "team.alpha")
    assert registry.get_or_create(("console", "system.buffer")) == at_buffer
    split = registry.get_or_create("console.system.buffer")  # a dotted string splits at every dot
    assert split != at_buffer
    assert registry.prune_for_response(split)[0] == "system"
    assert registry.lookup(split) == registry.lookup(at_buffer) == "console.system.buffer"


def test_get_registry_uses_the_backend_only_when_it_makes_the_registry(backend: SharedBackend) -> None:
    reset_registry()
    try:
        registry = get_registry(backend=backend)
        assert registry.backend is backend
        assert registry.is_shared is True
        assert get_registry() is registry
        assert get_registry(backend=InMemoryBackend()) is registry
        reset_registry()
        assert get_registry() is not registry
        assert get_registry().is_shared is False
    finally:
        reset_registry()


async def test_the_pumps_conversations_along_one_path_never_share_a_thread(backend: SharedBackend) -> None:
    both_arrived = asyncio.Barrier(2)
    seen: dict[str, str] = {}

    async def greeter(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        seen[payload.text] = metadata.thread_id
        await asyncio.wait_for(both_arrived.wait(), 5)  # both conversations are live at once
        return HandlerResponse.respond(Pong(payload.text))

    organism = Organism.of("paths", [Listener("greeter", [Ping], greeter, peers=[])])
    async with running(organism, backend=backend) as pump:
        dotted = ThreadRegistry(backend=backend).start_chain("console", "greeter")
        first = await pump.inject_payload(Ping("first"), "greeter")
        second = await pump.inject_payload(Ping("second"), "greeter")
        replies = [await first.next_reply(5), await second.next_reply(5)]
    assert [reply.payload for reply in replies] == [Pong("first"), Pong("second")]
    assert len({seen["first"], seen["second"], dotted, first.thread_id, second.thread_id}) == 5


def test_a_chain_written_straight_to_the_backend_reads_back_through_the_registry(backend: SharedBackend) -> None:
    """Reference code calls backend.registry_set("a.b", uuid) itself; the registry must see that chain."""
    registry = ThreadRegistry(backend=backend)
    backend.registry_set("legacy.router.greeter", "u-legacy")
    assert registry.lookup("u-legacy") == "legacy.router.greeter"
    caller, thread = registry.prune_for_response("u-legacy")
    assert caller == "router"
    assert thread == registry.get_or_create("legacy.router")
