"""The default backend: plain dicts in this process, guarded by one lock.

The lock makes every method atomic with respect to threads of this process
(the pump runs on one event-loop thread, but tools and tests may not).
Nothing is shared with other processes: ``is_shared`` is False.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from xml_pipeline.memory.shared_backend import BufferFull, TooManyThreads
from xml_pipeline.memory.state_ops import (
    AppendSlot,
    DeleteHistory,
    ForgetThread,
    RegisterThread,
    StateOp,
)


class InMemoryBackend:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[str, list[bytes]] = {}
        self._chain_to_uuid: dict[str, str] = {}
        self._uuid_to_chain: dict[str, str] = {}
        self._records: dict[tuple[str, str], dict[str, bytes]] = {}
        self._closed = False

    @property
    def is_shared(self) -> bool:
        return False

    def buffer_append(
        self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None, max_threads: int | None = None
    ) -> int:
        with self._lock:
            slots = self._buffers.get(thread_id)
            if slots is None:
                if max_threads is not None and len(self._buffers) >= max_threads:
                    raise TooManyThreads(f"the buffer holds {len(self._buffers)} threads already")
                slots = self._buffers[thread_id] = []
            elif max_slots is not None and len(slots) >= max_slots:
                raise BufferFull(f"thread {thread_id} holds {len(slots)} slots already")
            slots.append(slot_data)
            return len(slots) - 1

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        with self._lock:
            return list(self._buffers.get(thread_id, ()))

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        with self._lock:
            slots = self._buffers.get(thread_id)
            if slots is None or not 0 <= index < len(slots):
                return None
            return slots[index]

    def buffer_thread_len(self, thread_id: str) -> int:
        with self._lock:
            return len(self._buffers.get(thread_id, ()))

    def buffer_thread_exists(self, thread_id: str) -> bool:
        with self._lock:
            return thread_id in self._buffers

    def buffer_delete_thread(self, thread_id: str) -> bool:
        with self._lock:
            return self._buffers.pop(thread_id, None) is not None

    def buffer_list_threads(self) -> list[str]:
        with self._lock:
            return list(self._buffers)

    def buffer_clear(self) -> None:
        with self._lock:
            self._buffers.clear()

    def registry_set(self, chain: str, uuid: str) -> None:
        with self._lock:
            previous = self._chain_to_uuid.get(chain)
            if previous is not None and previous != uuid:
                self._uuid_to_chain.pop(previous, None)
            self._chain_to_uuid[chain] = uuid
            self._uuid_to_chain[uuid] = chain

    def registry_get_or_set(self, chain: str, uuid: str) -> str:
        with self._lock:
            existing = self._chain_to_uuid.get(chain)
            if existing is not None:
                return existing
            self._chain_to_uuid[chain] = uuid
            self._uuid_to_chain[uuid] = chain
            return uuid

    def registry_get_uuid(self, chain: str) -> str | None:
        return self._chain_to_uuid.get(chain)

    def registry_get_chain(self, uuid: str) -> str | None:
        return self._uuid_to_chain.get(uuid)

    def registry_delete(self, uuid: str) -> bool:
        with self._lock:
            chain = self._uuid_to_chain.pop(uuid, None)
            if chain is None:
                return False
            if self._chain_to_uuid.get(chain) == uuid:
                del self._chain_to_uuid[chain]
            return True

    def registry_list_all(self) -> dict[str, str]:
        with self._lock:
            return dict(self._uuid_to_chain)

    def registry_clear(self) -> None:
        with self._lock:
            self._chain_to_uuid.clear()
            self._uuid_to_chain.clear()

    def record_put(self, kind: str, record_id: str, field: str, value: bytes, *, only_if_absent: bool = False) -> bool:
        with self._lock:
            fields = self._records.setdefault((kind, record_id), {})
            if only_if_absent and field in fields:
                return False
            fields[field] = value
            return True

    def record_get(self, kind: str, record_id: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._records.get((kind, record_id), {}))

    def record_delete(self, kind: str, record_id: str) -> bool:
        with self._lock:
            return self._records.pop((kind, record_id), None) is not None

    def record_list(self, kind: str) -> list[str]:
        with self._lock:
            return [record_id for (record_kind, record_id) in self._records if record_kind == kind]

    def record_clear(self, kind: str) -> None:
        with self._lock:
            for key in [key for key in self._records if key[0] == kind]:
                del self._records[key]

    def apply(self, ops: Sequence[StateOp]) -> list[object]:
        """Each op as its method does it, dispatched by exact type, all under one hold of the lock.

        This runs for every hop, so the methods' bodies are inlined here (the lock is not reentrant); the
        reference tests hold both ways to the same outcomes.
        """
        results: list[object] = []
        buffers, chain_to_uuid, uuid_to_chain = self._buffers, self._chain_to_uuid, self._uuid_to_chain
        with self._lock:
            for op in ops:
                if type(op) is AppendSlot:
                    slots = buffers.get(op.thread_id)
                    if slots is None:
                        if op.max_threads is not None and len(buffers) >= op.max_threads:
                            results.append(TooManyThreads(f"the buffer holds {len(buffers)} threads already"))
                            continue
                        slots = buffers[op.thread_id] = []
                    elif op.max_slots is not None and len(slots) >= op.max_slots:
                        results.append(BufferFull(f"thread {op.thread_id} holds {len(slots)} slots already"))
                        continue
                    slots.append(op.slot)
                    results.append(len(slots) - 1)
                elif type(op) is RegisterThread:
                    chain, uuid = op.chain, op.uuid
                    previous = chain_to_uuid.get(chain)
                    if previous is not None and previous != uuid:
                        uuid_to_chain.pop(previous, None)
                    chain_to_uuid[chain] = uuid
                    uuid_to_chain[uuid] = chain
                    results.append(None)
                elif type(op) is ForgetThread:
                    forgotten = uuid_to_chain.pop(op.uuid, None)
                    if forgotten is not None and chain_to_uuid.get(forgotten) == op.uuid:
                        del chain_to_uuid[forgotten]
                    results.append(forgotten is not None)
                elif type(op) is DeleteHistory:
                    results.append(buffers.pop(op.thread_id, None) is not None)
                else:
                    raise TypeError(f"not a state op: {op!r}")
        return results

    def ping(self) -> bool:
        return not self._closed

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "type": "memory",
                "buffer_threads": len(self._buffers),
                "registry_entries": len(self._uuid_to_chain),
                "slots": sum(len(slots) for slots in self._buffers.values()),
            }

    def close(self) -> None:
        self._closed = True
