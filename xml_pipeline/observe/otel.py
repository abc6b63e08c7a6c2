"""OpenTelemetry spans for an organism (``pip install xml-pipeline[otel]``); importing this needs the extra.

The spans of one conversation form one trace:

- each hop is a span ``{from} → {to}`` (kind PRODUCER), recorded when the
  message is sent, with the conversation, thread, sender, target and payload
  type as attributes; a client's first message starts the trace, or joins the
  caller's when its request carried a W3C ``traceparent``;
- each handler call is a span ``handle {listener}`` (kind CONSUMER), the
  child of its hop, timed from the call to its return, with the error code
  and an error status when it failed;
- what a handler sends is a child of its handler span; a ``cpu_bound``
  handler's worker process continues the trace (the Task carries the
  traceparent) in a span ``run {listener}``, so spans the handler makes nest
  under it, when the worker's process has a tracer provider.

Hop references are the hop spans' traceparents, so a hop taken from a Redis
stream by another daemon continues the same trace.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from xml_pipeline import __version__

ROOTS_KEPT = 10_000
"""Conversations whose first hop's context is remembered, so a client's later messages join the same trace."""
_PROPAGATOR = TraceContextTextMapPropagator()


def _context(traceparent: str) -> Context:
    return _PROPAGATOR.extract({"traceparent": traceparent})


def _traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class OtelSpans:
    """The :class:`~xml_pipeline.observe.events.SpanMaker` for OpenTelemetry."""

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("xml_pipeline", __version__, tracer_provider=provider)
        self._roots: OrderedDict[str, Context] = OrderedDict()

    def hop_span(
        self, conversation: str, sender: str, to: str, thread: str, payload_type: str, parent: str | None
    ) -> str:
        if parent is not None:
            context: Context | None = _context(parent)
        else:
            context = self._roots.get(conversation)
        span = self._tracer.start_span(
            f"{sender} → {to}",
            context=context if context is not None else Context(),
            kind=SpanKind.PRODUCER,
            attributes={
                "xml_pipeline.conversation": conversation,
                "xml_pipeline.thread": thread,
                "xml_pipeline.from": sender,
                "xml_pipeline.to": to,
                "xml_pipeline.payload_type": payload_type,
            },
        )
        span.end()
        own = span.get_span_context()
        if not own.is_valid:  # no SDK behind the API: ids of our own, so traces still work
            return f"{random.getrandbits(64):016x}"
        if parent is None and context is None:
            self._roots[conversation] = trace.set_span_in_context(trace.NonRecordingSpan(own))
            if len(self._roots) > ROOTS_KEPT:
                self._roots.popitem(last=False)
        return _traceparent(own)

    def start_handler(self, ref: str, listener: str, conversation: str) -> tuple[Any, str]:
        span = self._tracer.start_span(
            f"handle {listener}",
            context=_context(ref) if len(ref) == 55 else Context(),
            kind=SpanKind.CONSUMER,
            attributes={"xml_pipeline.listener": listener, "xml_pipeline.conversation": conversation},
        )
        return span, _traceparent(span.get_span_context())

    def end_handler(self, span: Any, error: str, seconds: float) -> None:
        if error:
            span.set_attribute("xml_pipeline.error_code", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def ended(self, conversation: str) -> None:
        self._roots.pop(conversation, None)


@contextlib.contextmanager
def continued(traceparent: str, name: str) -> Iterator[None]:
    """In a worker process: run the block in a span under the daemon's handler span (``traceparent``)."""
    tracer = trace.get_tracer("xml_pipeline", __version__)
    with tracer.start_as_current_span(name, context=_context(traceparent), kind=SpanKind.INTERNAL):
        yield


def provider_from_environment(organism: str) -> TracerProvider:
    """A tracer provider exporting over OTLP, configured by the standard OTEL_* environment variables.

    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``), ``OTEL_EXPORTER_OTLP_HEADERS``,
    ``OTEL_SERVICE_NAME`` (default ``xml-pipeline-{organism}``), ``OTEL_RESOURCE_ATTRIBUTES``...
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    service = os.environ.get("OTEL_SERVICE_NAME") or f"xml-pipeline-{organism}"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
