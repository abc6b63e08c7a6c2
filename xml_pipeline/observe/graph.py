"""Running totals per listener and per edge, for the web view's graph (this daemon's share of the work).

Totals only: the page turns two readings into rates, so nothing here needs a
clock or a window. Client names and short-lived listeners (``system.buffer.*``)
are many, so the tables stop growing at ``MAX_ENTRIES``; existing entries keep counting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from xml_pipeline.observe.events import ErrorEvent, HandledEvent, HopEvent, Sink
from xml_pipeline.organism import Listener, is_reserved

MAX_ENTRIES = 1024


@dataclass(slots=True)
class _Totals:
    handled: int = 0
    errors: int = 0
    seconds: float = 0.0
    slowest: float = 0.0


class GraphStats(Sink):
    def __init__(self) -> None:
        self._listeners: dict[str, _Totals] = {}
        self._edges: dict[str, dict[str, int]] = {}
        """Messages by sender, then target: two lookups of strings cost less than hashing a new pair per hop."""
        self._edge_count = 0

    def hop(self, event: HopEvent) -> None:
        _, _, _, _, sender, to, _, _, _, _ = event
        row = self._edges.get(sender)
        if row is not None and to in row:
            row[to] += 1
        elif self._edge_count < MAX_ENTRIES:
            self._edges.setdefault(sender, {})[to] = 1
            self._edge_count += 1

    def handled(self, event: HandledEvent) -> None:
        _, _, _, listener, _, seconds, _ = event
        totals = self._listeners.get(listener) or self._totals(listener)
        if totals is None:
            return
        totals.handled += 1
        totals.seconds += seconds
        if seconds > totals.slowest:
            totals.slowest = seconds

    def error(self, event: ErrorEvent) -> None:
        listener = event[3]
        totals = self._totals(listener) if listener else None
        if totals is not None:
            totals.errors += 1

    def _totals(self, listener: str) -> _Totals | None:
        totals = self._listeners.get(listener)
        if totals is None and len(self._listeners) < MAX_ENTRIES:
            totals = self._listeners[listener] = _Totals()
        return totals

    def snapshot(self, listeners: dict[str, Listener]) -> dict[str, Any]:
        """The graph: every listener (its peers as edges it may use) with totals, and the edges messages took."""
        nodes = []
        for name, listener in listeners.items():
            totals = self._listeners.get(name, _Totals())
            nodes.append(
                {
                    "name": name,
                    "description": listener.description,
                    "ingress": listener.ingress,
                    "cpu_bound": listener.cpu_bound,
                    "system": is_reserved(name),
                    "peers": None if listener.peers is None else sorted(listener.peers),
                    "handled": totals.handled,
                    "errors": totals.errors,
                    "seconds": totals.seconds,
                    "slowest_seconds": totals.slowest,
                }
            )
        edges = [
            {"from": sender, "to": to, "messages": count}
            for sender, row in sorted(self._edges.items())
            for to, count in sorted(row.items())
        ]
        return {"at": time.time(), "listeners": nodes, "edges": edges}
