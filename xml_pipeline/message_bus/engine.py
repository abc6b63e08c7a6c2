"""What the daemon asks of an engine, whichever carries the messages.

Two engines run an organism: the in-process one
(:class:`~xml_pipeline.message_bus.in_process.InProcessEngine`, a pump and the
replies it keeps for clients in memory) and the durable one
(:class:`~xml_pipeline.cluster.engine.DurableEngine`, hops and replies in
Redis Streams). The daemon and its HTTP doors talk to :class:`Engine` only, so
a difference between the two lives in the engine that has it, never in a
branch of the daemon.

A client's message goes through three calls: :meth:`Engine.accept` takes the
bytes (or :meth:`Engine.refuse` answers a message the door could not even
read), and :meth:`Engine.collect` hands out the replies, on any later request,
to the client that sent it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from xml_pipeline.memory.store_watch import StoreWatch
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.message_bus.pump import PumpStats, ShutdownReport
from xml_pipeline.observe.events import Observation
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.process_pool.pool import CpuPool

__all__ = ["WAIT_MODES", "Accepted", "ClientEnvelope", "Collection", "Engine", "Refused"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """The engine has the client's message (the durable one: stored in Redis); ``thread`` is its conversation."""

    thread: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The message was not taken: why, and the SystemError envelope that says so to the client."""

    code: ErrorCode
    detail: str
    thread: str
    envelope: bytes


WAIT_MODES = ("none", "first", "end")
"""How long a collect waits: not at all, for the first reply, or until the conversation ends."""


class ClientEnvelope(Protocol):
    """A reply as a client reads it."""

    @property
    def envelope(self) -> bytes: ...


class Collection(Protocol):
    """What one collect hands over: the replies not handed out before, and whether the conversation is over.

    Every reply that had arrived is taken, so once ``ended`` is true nothing
    more will ever come for the conversation.
    """

    @property
    def replies(self) -> Sequence[ClientEnvelope]: ...

    @property
    def ended(self) -> bool: ...


class Engine(Protocol):
    """An organism's engine as the daemon drives it: lifecycle, the client's door, and what status shows."""

    @property
    def organism(self) -> Organism:
        """The organism being run; :meth:`reload` replaces it."""
        ...

    @property
    def limits(self) -> PumpLimits: ...

    @property
    def metrics(self) -> PumpMetrics:
        """Told of every message, error and handler call (the daemon's Prometheus metrics)."""
        ...

    @property
    def observe(self) -> Observation: ...

    @property
    def store_watch(self) -> StoreWatch:
        """The shared store's health, as ``/healthz`` and ``status`` report it."""
        ...

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float = ...) -> ShutdownReport:
        """Refuse new messages, let in-flight work finish within ``drain_timeout``, then stop."""
        ...

    def reload(self, organism: Organism) -> None:
        """Swap in a reloaded organism's listeners; work in flight keeps the listener it was given."""
        ...

    @property
    def healthy(self) -> bool:
        """False once the engine cannot go on (its dispatcher died, its store is lost): the daemon exits."""
        ...

    # ------------------------------------------------------------------ the client's door
    async def accept(self, raw: bytes, *, access: ClientAccess = ...) -> Accepted | Refused:
        """Take one envelope from a client that may send what ``access`` allows; never raises for bad input."""
        ...

    def refuse(self, code: ErrorCode, detail: str) -> Refused:
        """Refuse a message the door could not even read (too large, too slow), as any refusal is answered."""
        ...

    async def collect(
        self, conversation: str, mode: str, timeout: float, *, owner: str | None = None
    ) -> Collection | None:
        """The replies on ``conversation`` for client ``owner``; None if none are kept for that client.

        ``mode`` is one of :data:`WAIT_MODES`; a wait ends after ``timeout`` seconds with what has come.

        May raise ``OSError`` or ``RedisError`` when the replies live in a store that cannot be read now.
        """
        ...

    # ------------------------------------------------------------------ what status shows
    @property
    def listeners(self) -> dict[str, Listener]: ...

    @property
    def pool(self) -> CpuPool | None: ...

    def stats(self) -> PumpStats: ...

    async def cluster_status(self) -> dict[str, Any] | None:
        """Every daemon sharing the organism and each listener's backlog; None for an engine that shares nothing."""
        ...
