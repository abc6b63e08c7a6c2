"""The one protocol every state store implements.

Thread registry and context buffer keep nothing of their own: they speak to a
SharedBackend, so the same registry code runs on a dict in this process, a
multiprocessing manager, or Redis. Methods are synchronous because process-pool
workers call them from plain functions; each one is a single short operation,
and every operation that must not interleave with another process (claiming a
chain's thread, appending under a cap) is one method, so a backend can make it
atomic.

The method names and signatures are the reference design's, so code written
against it runs unchanged; our additions (caps on appends, records, batches)
are extra methods or optional keywords. :func:`get_shared_backend` opens the
backend a :class:`BackendConfig` names, as organism.yaml's ``backend`` section
does through :func:`xml_pipeline.memory.factory.open_backend`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    def buffer_append(
        self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None, max_threads: int | None = None
    ) -> int:
        """Append and return the slot's index (from 0).

        Raises BufferFull when the thread holds ``max_slots`` slots already, and
        TooManyThreads when ``thread_id`` is new and ``max_threads`` threads exist.
        A cap left out is no cap: the ContextBuffer always passes both, callers
        of the bare backend bound their own data.
        """
        ...

    def buffer_get_thread(self, thread_id: str) -> list[bytes]: ...
    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None: ...
    def buffer_thread_len(self, thread_id: str) -> int: ...
    def buffer_thread_exists(self, thread_id: str) -> bool: ...
    def buffer_delete_thread(self, thread_id: str) -> bool: ...
    def buffer_list_threads(self) -> list[str]: ...
    def buffer_clear(self) -> None: ...

    # --- thread registry: chain key <-> thread UUID ---
    def registry_set(self, chain: str, uuid: str) -> None:
        """Map ``chain`` to ``uuid`` and back; a UUID the chain had before is forgotten."""
        ...

    def registry_get_or_set(self, chain: str, uuid: str) -> str:
        """Register ``uuid`` for ``chain`` unless the chain has one; return the chain's UUID."""
        ...

    def registry_get_uuid(self, chain: str) -> str | None: ...
    def registry_get_chain(self, uuid: str) -> str | None: ...
    def registry_delete(self, uuid: str) -> bool:
        """Forget ``uuid`` and its chain (both directions); True if it was registered."""
        ...

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
    def info(self) -> dict[str, Any]:
        """Counts for operators: at least ``type``, ``buffer_threads`` and ``registry_entries``."""
        ...

    def close(self) -> None: ...


DEFAULT_REDIS_URL = "redis://localhost:6379"
DEFAULT_REDIS_PREFIX = "xp:"
DEFAULT_REDIS_TTL = 86_400
DEFAULT_REDIS_TIMEOUT_SECONDS = 1.0
"""How long one Redis call may wait for an answer: the most a stalled Redis can hold up the event loop."""
BACKEND_TYPES = ("memory", "manager", "redis")


@dataclass(frozen=True)
class BackendConfig:
    """Which backend to open, and how: the fields of organism.yaml's ``backend`` section.

    ``redis_ttl`` 0 means Redis keys never expire. ``manager_address`` and
    ``manager_authkey`` reach a running manager; without an address a
    manager backend starts its own.
    """

    backend_type: str = "memory"
    redis_url: str = DEFAULT_REDIS_URL
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    redis_ttl: int = DEFAULT_REDIS_TTL
    manager_address: str | tuple[str, int] | None = None
    manager_authkey: bytes | None = None
    redis_timeout_seconds: float = DEFAULT_REDIS_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        if self.backend_type not in BACKEND_TYPES:
            raise ValueError(f"backend_type must be one of {', '.join(BACKEND_TYPES)}, not {self.backend_type!r}")
        if self.redis_timeout_seconds <= 0:
            raise ValueError("redis_timeout_seconds must be positive")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BackendConfig:
        """The config organism.yaml's (already validated) ``backend`` section describes."""
        return cls(
            backend_type=str(settings.get("type", "memory")),
            redis_url=str(settings.get("redis_url", DEFAULT_REDIS_URL)),
            redis_prefix=str(settings.get("redis_prefix", DEFAULT_REDIS_PREFIX)),
            redis_ttl=int(settings.get("redis_ttl", DEFAULT_REDIS_TTL)),
            redis_timeout_seconds=float(settings.get("redis_timeout_seconds", DEFAULT_REDIS_TIMEOUT_SECONDS)),
        )


class _ProcessBackend:
    """The backend :func:`get_shared_backend` made, and the config it was made from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: tuple[BackendConfig, SharedBackend] | None = None

    def get(self, config: BackendConfig | None) -> SharedBackend:
        from xml_pipeline.memory.factory import create_backend  # the backends import this module

        with self._lock:
            if self._current is None:
                chosen = config if config is not None else BackendConfig()
                self._current = (chosen, create_backend(chosen))
            elif config is not None and config != self._current[0]:
                raise ValueError(
                    f"the shared backend is already open as {self._current[0]}; reset_shared_backend() first"
                )
            return self._current[1]

    def reset(self) -> None:
        with self._lock:
            current, self._current = self._current, None
        if current is not None:
            current[1].close()


_process_backend = _ProcessBackend()


def get_shared_backend(config: BackendConfig | None = None) -> SharedBackend:
    """This process's shared backend, opened from ``config`` on the first call (memory if None).

    Later calls return the same backend. One that names a different config
    raises ValueError rather than hand back a backend other than the one asked
    for; raises BackendUnavailable if a Redis server does not answer.
    """
    return _process_backend.get(config)


def reset_shared_backend() -> None:
    """Close and forget the process's shared backend (tests; a manager it started stops)."""
    _process_backend.reset()
