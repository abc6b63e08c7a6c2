"""Fail fast while the store does not answer, instead of making every call wait out its timeout.

A Redis that stops answering (SIGSTOP, a network partition, a full disk that
blocks it) does not refuse connections: each call waits for its socket
timeout. On the event loop that is a frozen daemon, once per call. The circuit
remembers the failure, and later calls raise ``BackendUnavailable`` at once.

Who lets calls through again depends on where the backend runs. In the daemon
the store watch probes off the event loop and closes the circuit when the store
answers (``retry_after=None``: no call on the loop ever waits for a dead
store). In a worker process or a tool, nobody probes, so after ``retry_after``
seconds the next call is let through and either closes the circuit or opens it
again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from xml_pipeline.memory.shared_backend import BackendUnavailable

log = logging.getLogger("xml_pipeline.state")


class Circuit:
    def __init__(self, retry_after: float | None = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_after = retry_after
        self._clock = clock
        self._reason: str | None = None
        self._opened_at = 0.0

    @property
    def is_open(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    def check(self) -> None:
        """Raise BackendUnavailable while open, unless it is time to let one call through."""
        reason = self._reason
        if reason is None:
            return
        if self.retry_after is not None and self._clock() - self._opened_at >= self.retry_after:
            self._opened_at = self._clock()  # this call is the trial; the others keep failing fast
            return
        raise BackendUnavailable(f"{reason} (failing fast until it answers again)")

    def trip(self, reason: str) -> None:
        if self._reason is None:
            self._opened_at = self._clock()
            log.warning("shared state unavailable: %s; calls fail at once until it answers again", reason)
        self._reason = reason

    def reset(self) -> None:
        if self._reason is not None:
            log.info("shared state is back: the store answers again")
        self._reason = None
