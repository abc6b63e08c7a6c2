"""organism.yaml's ``observe`` section, with its defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ObserveSettings:
    trace_retention_seconds: float = 300.0
    """How long a finished conversation's trace is kept; 0 turns tracing off."""
    trace_max_conversations: int = 1000
    """Traces kept at most (running and finished); a new one evicts the oldest."""
    trace_max_bytes: int = 65536
    """The most one conversation's trace holds, payloads included; further events are counted, not kept."""
    tail_buffer: int = 10_000
    """Events held for one ``tail`` watcher that has not read them yet; past it they are dropped and counted."""
    tail_max_watchers: int = 16
    opentelemetry: bool = False
    """Export spans through OpenTelemetry (needs ``pip install xml-pipeline[otel]``; OTEL_* variables configure it)."""

    @classmethod
    def from_settings(cls, section: Mapping[str, Any]) -> ObserveSettings:
        defaults = cls()
        return cls(
            trace_retention_seconds=float(section.get("trace_retention_seconds", defaults.trace_retention_seconds)),
            trace_max_conversations=int(section.get("trace_max_conversations", defaults.trace_max_conversations)),
            trace_max_bytes=int(section.get("trace_max_bytes", defaults.trace_max_bytes)),
            tail_buffer=int(section.get("tail_buffer", defaults.tail_buffer)),
            tail_max_watchers=int(section.get("tail_max_watchers", defaults.tail_max_watchers)),
            opentelemetry=bool(section.get("opentelemetry", defaults.opentelemetry)),
        )

    @property
    def tracing(self) -> bool:
        return self.trace_retention_seconds > 0
