"""Traces kept in the daemon's memory (backends ``memory`` and ``manager``), bounded three ways.

- **Count**: at most ``trace_max_conversations`` traces; a new one evicts the
  oldest finished trace, or the oldest of all when none has finished.
- **Bytes**: one trace holds at most ``trace_max_bytes`` (payload XML plus a
  fixed allowance per event); later events of that conversation are counted
  as dropped, never kept, so memory is bounded by count times bytes.
- **Time**: a finished trace is kept ``trace_retention_seconds``, then freed
  by the next read or sweep (the daemon sweeps every few seconds), whichever
  comes first; or earlier, by the count.

Events are kept as the event objects the engines reported (no copy, no encoding
on the hot path) and turned into records only when somebody reads them. An
event costs an append and a size check, a new conversation at most one
eviction; expiry waits for a read or sweep, and the total of bytes is summed
when asked for (measurement 8 of docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xml_pipeline.observe.events import ErrorEvent, HandledEvent, HopEvent, Sink
from xml_pipeline.observe.records import Record, end_record, event_record
from xml_pipeline.observe.settings import ObserveSettings

EVENT_BYTES = 256
"""What one event costs besides its payload XML: the allowance counted against ``trace_max_bytes``."""


@dataclass(frozen=True, slots=True)
class StoredTrace:
    records: list[Record]
    dropped: int


class _Lost:
    """What a trace did not keep (it had reached ``trace_max_bytes``), for its summary."""

    __slots__ = ("errors", "events", "first", "hops")

    def __init__(self) -> None:
        self.events = 0
        self.hops = 0
        self.errors = 0
        self.first: tuple[str, str] | None = None
        """(sender, to) of a client message lost before any was kept."""


class _Trace(list[HopEvent | HandledEvent | ErrorEvent]):
    """The events kept of one conversation, oldest first, and what its bounds need.

    A list itself, so that a new conversation costs no Python ``__init__`` (:meth:`MemoryTraceStore._open`
    sets the rest). Its summary (hops, errors, who started it) is counted when read."""

    __slots__ = ("ended", "lost", "size", "started")
    started: float
    """When its first event happened."""
    size: int
    """Bytes kept, as counted against ``trace_max_bytes``."""
    ended: float | None
    lost: _Lost | None


class MemoryTraceStore(Sink):
    def __init__(self, settings: ObserveSettings, clock: Callable[[], float] = time.time) -> None:
        self.retention = settings.trace_retention_seconds
        self.max_conversations = settings.trace_max_conversations
        self.max_bytes = settings.trace_max_bytes
        self._clock = clock
        self._traces: dict[str, _Trace] = {}
        """Every trace kept, oldest first (a dict keeps the order its keys were added in)."""
        self._finished: deque[tuple[float, str]] = deque()
        """(when its trace expires, conversation) of each finished trace kept, in the order they ended."""

    @property
    def size(self) -> int:
        """Bytes held by every trace, as counted against the bounds."""
        return sum(trace.size for trace in self._traces.values())

    # ------------------------------------------------------------------ the sink
    def hop(self, event: HopEvent) -> None:
        _, _, _, conversation, _, _, _, _, payload_xml, at = event
        self._keep(conversation, at, event, EVENT_BYTES + len(payload_xml))

    def handled(self, event: HandledEvent) -> None:
        _, _, conversation, _, at, _, _ = event
        self._keep(conversation, at, event, EVENT_BYTES)

    def error(self, event: ErrorEvent) -> None:
        _, _, conversation, _, _, detail, at = event
        self._keep(conversation, at, event, EVENT_BYTES + len(detail))

    def _keep(self, conversation: str, at: float, event: HopEvent | HandledEvent | ErrorEvent, size: int) -> None:
        """Add ``event`` (counted as ``size`` bytes) to its conversation's trace, or count it lost past the bound."""
        trace = self._traces.get(conversation)
        if trace is None:  # not `or`: a trace that kept nothing yet is an empty list
            trace = self._open(conversation, at)
        total = trace.size + size
        if total > self.max_bytes:
            _lose(trace, event)
        else:
            trace.append(event)
            trace.size = total

    def ended(self, conversation: str, at: float) -> None:
        trace = self._traces.get(conversation)
        if trace is None or trace.ended is not None:
            return
        trace.ended = at
        self._finished.append((self._clock() + self.retention, conversation))

    def _open(self, conversation: str, at: float) -> _Trace:
        """A new conversation's trace, in the room of the oldest finished one (or the oldest) if it takes it."""
        if len(self._traces) >= self.max_conversations:
            if self._finished:
                self._traces.pop(self._finished.popleft()[1], None)
            else:
                del self._traces[next(iter(self._traces))]
        trace = self._traces[conversation] = _Trace()
        trace.started, trace.size, trace.ended, trace.lost = at, 0, None, None
        return trace

    # ------------------------------------------------------------------ bounds
    def expire(self, now: float | None = None) -> None:
        """Free the finished traces whose retention has passed."""
        now = self._clock() if now is None else now
        finished = self._finished
        while finished and finished[0][0] <= now:
            self._traces.pop(finished.popleft()[1], None)

    # ------------------------------------------------------------------ reading
    async def trace(self, conversation: str) -> StoredTrace | None:
        self.expire()
        trace = self._traces.get(conversation)
        if trace is None:
            return None
        records = [event_record(event) for event in trace]
        if trace.ended is not None:
            records.append(end_record(trace.ended))
        return StoredTrace(records, trace.lost.events if trace.lost is not None else 0)

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` conversations traced, newest first."""
        self.expire()
        found = []
        for conversation in reversed(self._traces):
            trace = self._traces[conversation]
            found.append(_summary(conversation, trace))
            if len(found) >= limit:
                break
        return found

    def stats(self) -> dict[str, Any]:
        return {"traces": len(self._traces), "trace_bytes": self.size, "store": "memory"}


def _lose(trace: _Trace, event: HopEvent | HandledEvent | ErrorEvent) -> None:
    """Count an event the trace has no room for."""
    if trace.lost is None:
        trace.lost = _Lost()
    lost = trace.lost
    lost.events += 1
    if event[0] == "hop":
        lost.hops += 1
        _, _, parent, _, sender, to, _, _, _, _ = event
        if not parent and lost.first is None and _first(trace) is None:
            lost.first = (sender, to)
    elif event[0] == "error":
        lost.errors += 1


def _first(trace: _Trace) -> tuple[str, str] | None:
    """(sender, to) of the first client message kept."""
    for event in trace:
        if event[0] == "hop" and not event[2]:  # no parent
            return event[4], event[5]
    return None


def _summary(conversation: str, trace: _Trace) -> dict[str, Any]:
    lost = trace.lost or _Lost()
    first = lost.first or _first(trace) or ("", "")
    return {
        "conversation": conversation,
        "started": trace.started,
        "ended": trace.ended,
        "from": first[0],
        "to": first[1],
        "hops": lost.hops + sum(1 for event in trace if event[0] == "hop"),
        "errors": lost.errors + sum(1 for event in trace if event[0] == "error"),
    }
