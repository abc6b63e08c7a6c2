"""Traces kept in the daemon's memory (backends ``memory`` and ``manager``), bounded three ways.

- **Count**: at most ``trace_max_conversations`` traces; a new one evicts the
  oldest finished trace, or the oldest of all when none has finished.
- **Bytes**: one trace holds at most ``trace_max_bytes`` (payload XML plus a
  fixed allowance per event); later events of that conversation are counted
  as dropped, never kept, so memory is bounded by count times bytes.
- **Time**: a finished trace is kept ``trace_retention_seconds``, then freed
  by the next event, read or sweep, whichever comes first.

Events are kept as the event objects the engines reported (no copy, no encoding
on the hot path) and turned into records only when somebody reads them. An
event costs an append and a size check; a new conversation, a look at the
oldest finished trace (freed if due) and, when the count is reached, one
eviction; the total of bytes is summed when asked for (measurement 8 of
docs/benchmarks.md).
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


class _Trace(list[HopEvent | HandledEvent | ErrorEvent]):
    """The events kept of one conversation, oldest first, and the counts its bounds and summary need.

    A list itself, so that a new conversation costs no Python ``__init__``: :meth:`MemoryTraceStore._open`
    sets the counts."""

    __slots__ = ("dropped", "ended", "errors", "first", "hops", "size", "started")
    started: float
    """When its first event happened."""
    size: int
    """Bytes kept, as counted against ``trace_max_bytes``."""
    dropped: int
    hops: int
    """Hops recorded, kept or dropped."""
    errors: int
    first: tuple[str, str]
    """(sender, to) of its first client message."""
    ended: float | None


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
        _, _, parent, conversation, sender, to, _, _, payload_xml, at = event
        trace = self._traces.get(conversation)
        if trace is None:  # not `or`: a trace that kept nothing yet is an empty list
            trace = self._open(conversation, at)
        trace.hops += 1
        if not parent and not trace.first[0]:
            trace.first = (sender, to)
        size = trace.size + len(payload_xml) + EVENT_BYTES
        if size > self.max_bytes:
            trace.dropped += 1
        else:
            trace.append(event)
            trace.size = size

    def handled(self, event: HandledEvent) -> None:
        conversation, at = event[2], event[4]
        trace = self._traces.get(conversation)
        if trace is None:  # not `or`: a trace that kept nothing yet is an empty list
            trace = self._open(conversation, at)
        size = trace.size + EVENT_BYTES
        if size > self.max_bytes:
            trace.dropped += 1
        else:
            trace.append(event)
            trace.size = size

    def error(self, event: ErrorEvent) -> None:
        _, _, conversation, _, _, detail, at = event
        trace = self._traces.get(conversation)
        if trace is None:  # not `or`: a trace that kept nothing yet is an empty list
            trace = self._open(conversation, at)
        trace.errors += 1
        size = trace.size + EVENT_BYTES + len(detail)
        if size > self.max_bytes:
            trace.dropped += 1
        else:
            trace.append(event)
            trace.size = size

    def ended(self, conversation: str, at: float) -> None:
        trace = self._traces.get(conversation)
        if trace is None or trace.ended is not None:
            return
        trace.ended = at
        self._finished.append((self._clock() + self.retention, conversation))

    def _open(self, conversation: str, at: float) -> _Trace:
        """A new conversation's trace, after freeing what is due and making room."""
        if self._finished and self._finished[0][0] <= self._clock():
            self.expire()
        if len(self._traces) >= self.max_conversations:
            self._evict()
        trace = self._traces[conversation] = _Trace()
        trace.started, trace.size, trace.dropped, trace.hops, trace.errors = at, 0, 0, 0, 0
        trace.first, trace.ended = ("", ""), None
        return trace

    # ------------------------------------------------------------------ bounds
    def expire(self, now: float | None = None) -> None:
        """Free the finished traces whose retention has passed."""
        now = self._clock() if now is None else now
        finished = self._finished
        while finished and finished[0][0] <= now:
            self._traces.pop(finished.popleft()[1], None)

    def _evict(self) -> None:
        """Free the oldest finished trace, or the oldest of all when none has finished."""
        if self._finished:
            self._traces.pop(self._finished.popleft()[1], None)
        else:
            del self._traces[next(iter(self._traces))]

    # ------------------------------------------------------------------ reading
    async def trace(self, conversation: str) -> StoredTrace | None:
        self.expire()
        trace = self._traces.get(conversation)
        if trace is None:
            return None
        records = [event_record(event) for event in trace]
        if trace.ended is not None:
            records.append(end_record(trace.ended))
        return StoredTrace(records, trace.dropped)

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


def _summary(conversation: str, trace: _Trace) -> dict[str, Any]:
    return {
        "conversation": conversation,
        "started": trace.started,
        "ended": trace.ended,
        "from": trace.first[0],
        "to": trace.first[1],
        "hops": trace.hops,
        "errors": trace.errors,
    }
