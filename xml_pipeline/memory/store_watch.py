"""Know, without blocking anyone, whether the shared store answers.

The daemon's ``/healthz`` and ``status`` must answer at once whatever the store
does, and calls on the event loop must not wait for a store that stopped
answering. So one task probes the store every ``interval`` seconds in a
thread, each probe bounded by ``probe_timeout``, and keeps the verdict:

- ``ok``: the store answered the last probe (for Redis this also closes its
  circuit, letting calls through again).
- ``unavailable``: it did not answer; calls fail with ``backend-unavailable``
  (at once, once the circuit is open) and ``/healthz`` answers 503 until it does.
- ``lost``: its state is gone for good (the state manager process died). The
  pump stops counting as healthy, and the daemon exits non-zero so that its
  service manager restarts it with a fresh store.

A probe that is still running when the next one is due is not doubled: the
store is reported unavailable, and the running probe's answer is awaited.
The in-process store needs no watching and is always ``ok``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

from xml_pipeline.cancelling import raise_if_cancelling
from xml_pipeline.memory.circuit import Circuit
from xml_pipeline.memory.manager_backend import ManagerBackend
from xml_pipeline.memory.shared_backend import SharedBackend

log = logging.getLogger("xml_pipeline.state")


class StoreState(enum.Enum):
    OK = "ok"
    UNAVAILABLE = "unavailable"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class StoreHealth:
    state: StoreState
    detail: str = ""
    since: float = 0.0
    """time.time() of the last change."""

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state.value, "detail": self.detail, "since": round(self.since, 3)}


class StoreWatch:
    def __init__(self, backend: SharedBackend, *, interval: float = 1.0, probe_timeout: float = 2.0) -> None:
        self.backend = backend
        self.interval = interval
        self.probe_timeout = probe_timeout
        self._health = StoreHealth(StoreState.OK, since=time.time())
        self._probe: asyncio.Future[bool] | None = None
        self._circuit: Circuit | None = getattr(backend, "circuit", None)

    @property
    def health(self) -> StoreHealth:
        """The last probe's verdict, or ``unavailable`` at once when a call has just found the store gone."""
        circuit = self._circuit
        if self._health.state is StoreState.OK and circuit is not None and circuit.is_open:
            return StoreHealth(StoreState.UNAVAILABLE, circuit.reason or "", self._health.since)
        return self._health

    @property
    def needed(self) -> bool:
        return self.backend.is_shared

    async def run(self) -> None:
        """Probe until cancelled (the pump runs this in its task group)."""
        while True:
            raise_if_cancelling()
            await self.probe_once()
            await asyncio.sleep(self.interval)

    async def probe_once(self) -> StoreHealth:
        if self._health.state is StoreState.LOST:
            return self._health
        lost = self.backend.lost() if isinstance(self.backend, ManagerBackend) else None
        if lost is not None:
            log.critical("shared state lost: %s", lost)
            return self._set(StoreState.LOST, lost)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(asyncio.to_thread(self.backend.ping))
        try:
            async with asyncio.timeout(self.probe_timeout):
                answered = await asyncio.shield(self._probe)
        except TimeoutError:
            return self._set(StoreState.UNAVAILABLE, f"the store did not answer within {self.probe_timeout:g}s")
        except Exception as exc:  # a probe that broke is a store that did not answer
            raise_if_cancelling()
            return self._set(StoreState.UNAVAILABLE, f"the store could not be asked: {exc}")
        if not answered:
            return self._set(StoreState.UNAVAILABLE, "the store does not answer")
        return self._set(StoreState.OK, "")

    def _set(self, state: StoreState, detail: str) -> StoreHealth:
        previous = self._health.state
        if state is not previous:
            if self._circuit is None:  # a store with a circuit has its transitions logged there
                _log_transition(state, detail)
            self._health = StoreHealth(state, detail, time.time())
        elif detail != self._health.detail:
            self._health = StoreHealth(state, detail, self._health.since)
        return self._health

    async def close(self) -> None:
        """Wait (bounded) for a probe still running in its thread, so none outlives the pump."""
        probe = self._probe
        if probe is not None and not probe.done():
            try:
                async with asyncio.timeout(self.probe_timeout):
                    await asyncio.shield(probe)
            except Exception:
                log.warning("a store probe was still running at shutdown")


def _log_transition(state: StoreState, detail: str) -> None:
    if state is StoreState.OK:
        log.info("shared state is back: the store answers again")
    elif state is StoreState.UNAVAILABLE:
        log.warning("shared state unavailable: %s", detail)
