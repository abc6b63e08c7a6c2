"""The live tail: hops and errors as they happen, fanned out to watchers (``GET /events``).

Each watcher has its own bounded buffer (``tail_buffer`` events). The engine
only ever appends to it: a watcher that reads slowly, or not at all, loses the
events that do not fit, and is told how many with the next ones it reads. The
engine never waits for a watcher. With nobody watching, the hub is not
listening, so the observation does not call it at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xml_pipeline.observe.events import ErrorEvent, HopEvent, Sink


class TooManyWatchers(Exception):
    pass


@dataclass(slots=True)
class Watcher:
    listener: str | None
    """Only events that involve this listener (as sender, target, or where an error arose)."""
    errors_only: bool
    capacity: int
    events: deque[HopEvent | ErrorEvent] = field(default_factory=deque)
    dropped: int = 0
    """Events lost since the watcher last read."""
    dropped_total: int = 0
    delivered: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: HopEvent | ErrorEvent) -> None:
        if len(self.events) >= self.capacity:
            self.dropped += 1
            self.dropped_total += 1
        else:
            self.events.append(event)
        self.ready.set()

    def take(self) -> tuple[list[HopEvent | ErrorEvent], int]:
        """Everything buffered, and how many were dropped since the last take."""
        events, dropped = list(self.events), self.dropped
        self.events.clear()
        self.dropped = 0
        self.ready.clear()
        self.delivered += len(events)
        return events, dropped


class EventHub(Sink):
    def __init__(self, buffer: int, max_watchers: int) -> None:
        self.buffer = buffer
        self.max_watchers = max_watchers
        self._watchers: tuple[Watcher, ...] = ()
        self.closed = False
        self._changed: list[Callable[[], None]] = []

    def listening(self) -> bool:
        return bool(self._watchers)

    def attached(self, changed: Callable[[], None]) -> None:
        self._changed.append(changed)

    def _set_watchers(self, watchers: tuple[Watcher, ...]) -> None:
        self._watchers = watchers
        for changed in self._changed:
            changed()

    def hop(self, event: HopEvent) -> None:
        for watcher in self._watchers:
            if watcher.errors_only:
                continue
            if watcher.listener is not None and watcher.listener not in (event[4], event[5]):  # sender, to
                continue
            watcher.offer(event)

    def error(self, event: ErrorEvent) -> None:
        for watcher in self._watchers:
            if watcher.listener is not None and watcher.listener != event[3]:  # the listener
                continue
            watcher.offer(event)

    def watch(self, listener: str | None, errors_only: bool) -> Watcher:
        if len(self._watchers) >= self.max_watchers:
            raise TooManyWatchers(f"{self.max_watchers} watchers are connected already")
        watcher = Watcher(listener, errors_only, self.buffer)
        self._set_watchers((*self._watchers, watcher))
        return watcher

    def close(self) -> None:
        """The daemon is stopping: every watcher's stream ends after what it has buffered."""
        self.closed = True
        for watcher in self._watchers:
            watcher.ready.set()

    def forget(self, watcher: Watcher) -> None:
        self._set_watchers(tuple(w for w in self._watchers if w is not watcher))

    def stats(self) -> dict[str, Any]:
        return {
            "watchers": len(self._watchers),
            "tail_buffered": sum(len(w.events) for w in self._watchers),
            "tail_dropped": sum(w.dropped_total for w in self._watchers),
        }


def tail_event(event: HopEvent | ErrorEvent) -> dict[str, Any]:
    """What ``GET /events`` sends for an event (JSON)."""
    if event[0] == "hop":
        _, hop, parent, conversation, sender, to, thread, payload_type, _, at = event
        return {
            "kind": "hop",
            "at": at,
            "conversation": conversation,
            "hop": hop,
            "parent": parent,
            "from": sender,
            "to": to,
            "thread": thread,
            "type": payload_type,
        }
    _, hop, conversation, listener, code, detail, at = event
    return {
        "kind": "error",
        "at": at,
        "conversation": conversation,
        "hop": hop,
        "listener": listener,
        "code": code,
        "detail": detail,
    }
