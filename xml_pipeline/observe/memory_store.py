"""Traces kept in the daemon's memory (backends ``memory`` and ``manager``), bounded three ways.

- **Count**: at most ``trace_max_conversations`` traces; a new one evicts the
  oldest finished trace, or the oldest of all when none has finished.
- **Bytes**: one trace holds at most ``trace_max_bytes`` (payload XML plus a
  fixed allowance per event); later events of that conversation are counted
  as dropped, never kept, so memory is bounded by count times bytes.
- **Time**: a finished trace is kept ``trace_retention_seconds``, then freed
  by the next event, read or sweep, whichever comes first.

Events are kept as the event objects the engines reported (no copy, no encoding
on the hot path) and turned into records only when somebody reads them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xml_pipeline.observe.events import ErrorEvent, HandledEvent, HopEvent, Sink
from xml_pipeline.observe.records import Record, end_record, error_record, handled_record, hop_record
from xml_pipeline.observe.settings import ObserveSettings

EVENT_BYTES = 256
"""What one event costs besides its payload XML: the allowance counted against ``trace_max_bytes``."""


@dataclass(frozen=True, slots=True)
class StoredTrace:
    records: list[Record]
    dropped: int


class _Trace:
    __slots__ = ("dropped", "ended", "errors", "events", "first", "hops", "size", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.events: list[HopEvent | HandledEvent | ErrorEvent] = []
        self.size = 0
        self.dropped = 0
        self.hops = 0
        self.errors = 0
        self.first = ("", "")
        self.ended: float | None = None


class MemoryTraceStore(Sink):
    def __init__(self, settings: ObserveSettings, clock: Callable[[], float] = time.time) -> None:
        self.retention = settings.trace_retention_seconds
        self.max_conversations = settings.trace_max_conversations
        self.max_bytes = settings.trace_max_bytes
        self._clock = clock
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._finished: OrderedDict[str, float] = OrderedDict()
        """Finished conversations, in the order they ended, with when their trace expires."""
        self.size = 0
        """Bytes held by every trace, as counted against the bounds."""

    # ------------------------------------------------------------------ the sink
    def hop(self, event: HopEvent) -> None:
        trace = self._add(event.conversation, event, len(event.payload_xml) + EVENT_BYTES)
        trace.hops += 1
        if not event.parent and not trace.first[0]:
            trace.first = (event.sender, event.to)

    def handled(self, event: HandledEvent) -> None:
        self._add(event.conversation, event, EVENT_BYTES)

    def error(self, event: ErrorEvent) -> None:
        self._add(event.conversation, event, EVENT_BYTES + len(event.detail)).errors += 1

    def ended(self, conversation: str, at: float) -> None:
        trace = self._traces.get(conversation)
        if trace is None or trace.ended is not None:
            return
        trace.ended = at
        self._finished[conversation] = self._clock() + self.retention

    def _add(self, conversation: str, event: HopEvent | HandledEvent | ErrorEvent, size: int) -> _Trace:
        trace = self._traces.get(conversation)
        if trace is None:
            self.expire()
            if len(self._traces) >= self.max_conversations:
                self._evict()
            trace = self._traces[conversation] = _Trace(time.time())
        if trace.size + size > self.max_bytes:
            trace.dropped += 1
        else:
            trace.events.append(event)
            trace.size += size
            self.size += size
        return trace

    # ------------------------------------------------------------------ bounds
    def expire(self, now: float | None = None) -> None:
        """Free the finished traces whose retention has passed."""
        now = self._clock() if now is None else now
        while self._finished:
            conversation, until = next(iter(self._finished.items()))
            if until > now:
                return
            self._forget(conversation)

    def _evict(self) -> None:
        oldest = next(iter(self._finished)) if self._finished else next(iter(self._traces))
        self._forget(oldest)

    def _forget(self, conversation: str) -> None:
        self._finished.pop(conversation, None)
        trace = self._traces.pop(conversation, None)
        if trace is not None:
            self.size -= trace.size

    # ------------------------------------------------------------------ reading
    async def trace(self, conversation: str) -> StoredTrace | None:
        self.expire()
        trace = self._traces.get(conversation)
        if trace is None:
            return None
        records = [_record(event) for event in trace.events]
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


def _record(event: HopEvent | HandledEvent | ErrorEvent) -> Record:
    if isinstance(event, HopEvent):
        return hop_record(event)
    if isinstance(event, HandledEvent):
        return handled_record(event)
    return error_record(event)


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
