"""Prometheus metrics for the daemon, fed by the pump's hooks.

Each daemon has its own registry, so tests and embedders can run several
without clashing over the process-global default one.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.message_bus.pump import PumpStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PrometheusMetrics(PumpMetrics):
    def __init__(self, stats: Callable[[], PumpStats]) -> None:
        self.registry = CollectorRegistry()
        self._messages_in = Counter(
            "xml_pipeline_messages_in",
            "Messages dispatched to a listener's handler.",
            ["listener"],
            registry=self.registry,
        )
        self._messages_out = Counter(
            "xml_pipeline_messages_out", "Messages a listener's handler sent on.", ["listener"], registry=self.registry
        )
        self._errors = Counter(
            "xml_pipeline_errors", "SystemErrors produced, by code.", ["code"], registry=self.registry
        )
        for code in ErrorCode:
            self._errors.labels(code.value)
        self._ingress = Counter(
            "xml_pipeline_ingress", "Client messages at the door, by outcome.", ["outcome"], registry=self.registry
        )
        self._handler_seconds = Histogram(
            "xml_pipeline_handler_seconds",
            "Time one handler call took, whatever its outcome.",
            ["listener"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._redelivered = Counter(
            "xml_pipeline_redelivered",
            "Hops claimed from a silent daemon to be handled again (delivery: at-least-once).",
            ["listener"],
            registry=self.registry,
        )
        self._dead_lettered = Counter(
            "xml_pipeline_dead_lettered",
            "Hops moved to the dead-letter stream after max_deliveries (delivery: at-least-once).",
            ["listener"],
            registry=self.registry,
        )
        self._reloads = Counter(
            "xml_pipeline_reloads", "organism.yaml reloads, by result.", ["result"], registry=self.registry
        )
        gauges = {
            "queue_depth": "Messages waiting for dispatch.",
            "in_flight": "Handler calls running now.",
            "conversations": "Conversations open now.",
            "threads": "Threads of this daemon's open conversations.",
        }
        for field, description in gauges.items():
            gauge = Gauge(f"xml_pipeline_{field}", description, registry=self.registry)
            gauge.set_function(_reader(stats, field))

    def message_in(self, listener: str) -> None:
        self._messages_in.labels(listener).inc()

    def message_out(self, listener: str) -> None:
        self._messages_out.labels(listener).inc()

    def handler_finished(self, listener: str, seconds: float) -> None:
        self._handler_seconds.labels(listener).observe(seconds)

    def error(self, code: ErrorCode) -> None:
        self._errors.labels(code.value).inc()

    def ingress(self, accepted: bool) -> None:
        self._ingress.labels("accepted" if accepted else "refused").inc()

    def redelivered(self, listener: str) -> None:
        self._redelivered.labels(listener).inc()

    def dead_lettered(self, listener: str) -> None:
        self._dead_lettered.labels(listener).inc()

    def reload(self, succeeded: bool) -> None:
        self._reloads.labels("ok" if succeeded else "failed").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _reader(stats: Callable[[], PumpStats], field: str) -> Callable[[], float]:
    """Read one PumpStats field when Prometheus scrapes, never in between."""
    return lambda: float(getattr(stats(), field))
