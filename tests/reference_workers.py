"""What a spawned process does with a ManagerBackend it reaches by address and authkey."""

from __future__ import annotations

from xml_pipeline.memory.manager_backend import Address, ManagerBackend


def append_and_register(address: Address, authkey: bytes, thread_id: str, slot_data: bytes) -> tuple[int, str | None]:
    """Append one slot and register one chain from this process; return the index and what it reads back."""
    backend = ManagerBackend(address=address, authkey=authkey)
    try:
        index = backend.buffer_append(thread_id, slot_data)
        backend.registry_set("spawned.chain", "spawned-uuid")
        return index, backend.registry_get_chain("spawned-uuid")
    finally:
        backend.close()
