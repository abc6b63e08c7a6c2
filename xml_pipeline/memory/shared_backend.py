"""The one protocol every state store implements.

Thread registry and context buffer keep nothing of their own: they speak to a
SharedBackend, so the same registry code runs on a dict in this process, a
multiprocessing manager, or Redis. Methods are synchronous because process-pool
workers call them from plain functions; each one is a single short operation,
and every operation that must not interleave with another process (claiming a
chain's thread, appending under a cap) is one method, so a backend can make it
atomic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from xml_pipeline.memory.state_ops import StateOp


class BufferFull(Exception):
    """The thread already holds the most slots a thread may hold."""


class TooManyThreads(Exception):
    """The buffer already holds the most threads it may hold."""


class BackendUnavailable(Exception):
    """The shared store cannot be reached (after the retries the backend allows itself)."""


@runtime_checkable
class SharedBackend(Protocol):
    @property
    def is_shared(self) -> bool:
        """True when other processes see the same state."""
        ...

    # --- context buffer: per-thread, append-only lists of encoded slots ---
    def buffer_append(self, thread_id: str, slot: bytes, *, max_slots: int, max_threads: int) -> int:
        """Append and return the slot's index; raise BufferFull or TooManyThreads at the caps."""
        ...

    def buffer_get_thread(self, thread_id: str) -> list[bytes]: ...
    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None: ...
    def buffer_thread_len(self, thread_id: str) -> int: ...
    def buffer_thread_exists(self, thread_id: str) -> bool: ...
    def buffer_delete_thread(self, thread_id: str) -> bool: ...
    def buffer_list_threads(self) -> list[str]: ...
    def buffer_clear(self) -> None: ...

    # --- thread registry: chain key <-> thread UUID ---
    def registry_set(self, chain: str, uuid: str) -> None: ...

    def registry_get_or_set(self, chain: str, uuid: str) -> str:
        """Register ``uuid`` for ``chain`` unless the chain has one; return the chain's UUID."""
        ...

    def registry_get_uuid(self, chain: str) -> str | None: ...
    def registry_get_chain(self, uuid: str) -> str | None: ...
    def registry_delete(self, uuid: str) -> bool: ...
    def registry_list_all(self) -> dict[str, str]:
        """Every registered thread, UUID -> chain key."""
        ...

    def registry_clear(self) -> None: ...

    # --- records: small field maps for orchestration state (buffers, sequences) ---
    def record_put(self, kind: str, record_id: str, field: str, value: bytes, *, only_if_absent: bool = False) -> bool:
        """Set one field; with ``only_if_absent`` only if it is not set yet. True when written."""
        ...

    def record_get(self, kind: str, record_id: str) -> dict[str, bytes]: ...
    def record_delete(self, kind: str, record_id: str) -> bool: ...
    def record_list(self, kind: str) -> list[str]: ...
    def record_clear(self, kind: str) -> None: ...

    # --- many writes at once ---
    def apply(self, ops: Sequence[StateOp]) -> list[object]:
        """Run ``ops`` in order, in as few round trips as the store allows.

        Returns each op's result, or the exception it raised, in order; raises
        only when the store cannot be reached at all (BackendUnavailable).
        """
        ...

    # --- housekeeping ---
    def ping(self) -> bool: ...
    def info(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
