"""Functions that spawned processes run against a shared backend, for the race tests."""

from __future__ import annotations

from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.manager_backend import ManagerBackend, ManagerSpec
from xml_pipeline.memory.redis_backend import RedisBackend, RedisSpec
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message_bus.thread_registry import ThreadRegistry


def connect(spec: ManagerSpec | RedisSpec) -> SharedBackend:
    return ManagerBackend.connect(spec) if isinstance(spec, ManagerSpec) else RedisBackend.from_spec(spec)


def claim_chains(spec: ManagerSpec | RedisSpec, conversation: str, chains: list[list[str]]) -> list[str]:
    registry = ThreadRegistry(connect(spec))
    return [registry.get_or_create(chain, conversation) for chain in chains]


def append_slots(spec: ManagerSpec | RedisSpec, thread: str, writer: int, count: int) -> list[int]:
    buffer = ContextBuffer(connect(spec))
    return [
        buffer.append(
            thread, from_id=f"w{writer}", to_id="x", payload_type="m:T", payload_xml=f"<T>{i}</T>".encode()
        ).index
        for i in range(count)
    ]
