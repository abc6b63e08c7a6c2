"""Measurement 8: what seeing costs. The same hop workload on three pumps running side by side:
nothing attached, the daemon's default observation (traces in memory, the tail's hub with nobody
watching, the graph's totals), and that plus OpenTelemetry spans through the SDK's batch processor
into an exporter that drops them (the SDK's own cost, without a collector's network)."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from benchmarks.measure import CLIENTS, Result, closed_loop, envelope, orders_organism, running
from benchmarks.paired import Paired, interleaved
from benchmarks.workload import sample_order
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.observe.graph import GraphStats
from xml_pipeline.observe.hub import EventHub
from xml_pipeline.observe.memory_store import MemoryTraceStore
from xml_pipeline.observe.otel import OtelSpans
from xml_pipeline.observe.settings import ObserveSettings

HOPS_PER_ROUND_TRIP = 2
"""client -> orders, and the receipt back: both are recorded hops."""


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _observe_as_the_daemon_does(pump: Pump) -> None:
    settings = ObserveSettings()
    pump.observe.attach(EventHub(settings.tail_buffer, settings.tail_max_watchers))
    pump.observe.attach(GraphStats())
    pump.observe.attach(MemoryTraceStore(settings))


async def observation_cost(hops: int, repeats: int) -> Result:
    order = envelope(sample_order(), "orders")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=65536))
    trips = hops // HOPS_PER_ROUND_TRIP
    try:
        async with (
            running(orders_organism()) as plain,
            running(orders_organism()) as traced,
            running(orders_organism()) as spanned,
        ):
            _observe_as_the_daemon_does(traced)
            _observe_as_the_daemon_does(spanned)
            spanned.observe.attach_spans(OtelSpans(provider))
            for pump in (plain, traced, spanned):
                await closed_loop(pump, order, min(trips, 2000), CLIENTS)  # warm-up
            figures = await interleaved(
                repeats,
                {
                    "off": lambda: closed_loop(plain, order, trips, CLIENTS),
                    "tracing": lambda: closed_loop(traced, order, trips, CLIENTS),
                    "otel": lambda: closed_loop(spanned, order, trips, CLIENTS),
                },
            )
    finally:
        provider.shutdown()
    hop_rates = {name: [HOPS_PER_ROUND_TRIP * rate for rate in rates] for name, rates in figures.items()}
    tracing = Paired.of("tracing on", hop_rates["tracing"], "off", hop_rates["off"])
    otel = Paired.of("tracing and OpenTelemetry on", hop_rates["otel"], "off", hop_rates["off"])
    return Result(
        "8. observation cost (in-process, memory: hop throughput with tracing on and off)",
        f"tracing on {tracing.subject_figure.text(',.0f')} hops/s; with OpenTelemetry spans "
        f"{otel.subject_figure.text(',.0f')} hops/s (median [range] of {repeats})",
        f"nothing attached {tracing.baseline_figure.text(',.0f')} hops/s",
        "median tracing on / off >= 0.9 (OpenTelemetry: reported)",
        tracing.ratio.median >= 0.9,
        {"tracing on": tracing, "OpenTelemetry on": otel},
    )
