"""Shared state on one machine without a server: a multiprocessing manager.

One manager process holds an :class:`InMemoryBackend`; the daemon and every
spawned worker talk to it through proxies, by address and authkey. Each
backend method is one call served under the backend's lock, so every method is
atomic across processes, exactly as on the memory backend within one.

The address of a manager this module starts is a Unix socket in a private
temporary directory; the authkey is 32 random bytes unless the caller names
one. Workers receive both through :attr:`ManagerBackend.spec` (a small
picklable value), never a private manager of their own.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.managers import BaseManager
from typing import Any

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import BackendUnavailable, BufferFull, TooManyThreads
from xml_pipeline.memory.state_ops import StateOp
from xml_pipeline.process_pool.orphans import exit_with_parent

_STATE = InMemoryBackend()


def _state() -> InMemoryBackend:
    return _STATE


class _StateManager(BaseManager):
    pass


_StateManager.register("state", callable=_state)


Address = str | tuple[str, int]
"""A Unix socket path, or (host, port) for a manager that listens on TCP."""


@dataclass(frozen=True, slots=True)
class ManagerSpec:
    """How a worker process reaches the manager."""

    address: Address
    authkey: bytes


class ManagerBackend:
    """A SharedBackend whose state lives in a manager process.

    ``ManagerBackend()`` starts that process and owns it; ``ManagerBackend(address,
    authkey)`` reaches one that is already running, from any process (a spawned
    one included), and owns nothing. ``address`` and ``authkey`` are what a
    second process needs; ``close()`` stops the manager only if this instance
    started it.
    """

    def __init__(self, address: Address | None = None, authkey: bytes | None = None) -> None:
        self._owner: _StateManager | None = None
        self._workdir: str | None = None
        if address is None:
            self._workdir = tempfile.mkdtemp(prefix="xp-manager-")
            os.chmod(self._workdir, 0o700)
            self.spec = ManagerSpec(
                os.path.join(self._workdir, "state.sock"), authkey if authkey is not None else os.urandom(32)
            )
            manager = _StateManager(
                address=self.spec.address, authkey=self.spec.authkey, ctx=multiprocessing.get_context("spawn")
            )
            manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
            self._owner = manager
        else:
            key = authkey if authkey is not None else bytes(multiprocessing.current_process().authkey)
            self.spec = ManagerSpec(address, key)
            manager = _StateManager(address=address, authkey=key)
            try:
                manager.connect()
            except OSError as exc:
                raise BackendUnavailable(f"cannot reach the state manager at {address}: {exc}") from None
        self._state: Any = manager.state()  # type: ignore[attr-defined]

    @classmethod
    def start(cls) -> ManagerBackend:
        """Start the manager process (spawned) and connect to it; the caller owns it."""
        return cls()

    @classmethod
    def connect(cls, spec: ManagerSpec) -> ManagerBackend:
        """Reach a running manager from another process."""
        return cls(spec.address, spec.authkey)

    @property
    def address(self) -> Address:
        return self.spec.address

    @property
    def authkey(self) -> bytes:
        return self.spec.authkey

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._state, method)(*args, **kwargs)
        except (BufferFull, TooManyThreads):
            raise
        except (OSError, EOFError) as exc:
            raise BackendUnavailable(f"the state manager is gone: {exc}") from None

    @property
    def is_shared(self) -> bool:
        return True

    def buffer_append(
        self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None, max_threads: int | None = None
    ) -> int:
        return int(self._call("buffer_append", thread_id, slot_data, max_slots=max_slots, max_threads=max_threads))

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        return list(self._call("buffer_get_thread", thread_id))

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        result: bytes | None = self._call("buffer_get_slot", thread_id, index)
        return result

    def buffer_thread_len(self, thread_id: str) -> int:
        return int(self._call("buffer_thread_len", thread_id))

    def buffer_thread_exists(self, thread_id: str) -> bool:
        return bool(self._call("buffer_thread_exists", thread_id))

    def buffer_delete_thread(self, thread_id: str) -> bool:
        return bool(self._call("buffer_delete_thread", thread_id))

    def buffer_list_threads(self) -> list[str]:
        return list(self._call("buffer_list_threads"))

    def buffer_clear(self) -> None:
        self._call("buffer_clear")

    def registry_set(self, chain: str, uuid: str) -> None:
        self._call("registry_set", chain, uuid)

    def registry_get_or_set(self, chain: str, uuid: str) -> str:
        return str(self._call("registry_get_or_set", chain, uuid))

    def registry_get_uuid(self, chain: str) -> str | None:
        result: str | None = self._call("registry_get_uuid", chain)
        return result

    def registry_get_chain(self, uuid: str) -> str | None:
        result: str | None = self._call("registry_get_chain", uuid)
        return result

    def registry_delete(self, uuid: str) -> bool:
        return bool(self._call("registry_delete", uuid))

    def registry_list_all(self) -> dict[str, str]:
        return dict(self._call("registry_list_all"))

    def registry_clear(self) -> None:
        self._call("registry_clear")

    def record_put(self, kind: str, record_id: str, field: str, value: bytes, *, only_if_absent: bool = False) -> bool:
        return bool(self._call("record_put", kind, record_id, field, value, only_if_absent=only_if_absent))

    def record_get(self, kind: str, record_id: str) -> dict[str, bytes]:
        return dict(self._call("record_get", kind, record_id))

    def record_delete(self, kind: str, record_id: str) -> bool:
        return bool(self._call("record_delete", kind, record_id))

    def record_list(self, kind: str) -> list[str]:
        return list(self._call("record_list", kind))

    def record_clear(self, kind: str) -> None:
        self._call("record_clear", kind)

    def apply(self, ops: Sequence[StateOp]) -> list[object]:
        """One call to the manager for the whole batch, run there under its lock op by op."""
        return list(self._call("apply", list(ops)))

    def ping(self) -> bool:
        try:
            return bool(self._call("ping"))
        except BackendUnavailable:
            return False

    def info(self) -> dict[str, Any]:
        return {**self._call("info"), "type": "manager", "address": self.spec.address}

    @property
    def manager_pid(self) -> int | None:
        """The pid of the manager process this instance started; None when it only connected to one."""
        process = getattr(self._owner, "_process", None)  # BaseManager has no public handle on it
        return None if process is None else int(process.pid)

    def lost(self) -> str | None:
        """Why the state is gone for good, if it is: the manager this instance started has exited.

        Unlike Redis, a manager holds its state in its own memory, so it cannot
        come back: what it held is lost, and the conversations that used it
        cannot go on.
        """
        process = getattr(self._owner, "_process", None)
        if process is None or process.is_alive():
            return None
        return f"the state manager (pid {process.pid}) exited with code {process.exitcode}; the state it held is lost"

    def close(self) -> None:
        """Disconnect; the owner also stops the manager process and removes its socket."""
        if self._owner is not None:
            self._owner.shutdown()
            self._owner = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
