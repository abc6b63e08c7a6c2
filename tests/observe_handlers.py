"""Handlers for the OpenTelemetry tests; importable by worker processes."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import trace

from tests.support import Ping
from xml_pipeline import HandlerMetadata, HandlerResponse


@dataclass(frozen=True)
class Seen:
    """The trace context a handler found itself in: trace id and span id, in hex."""

    context: str


async def via_worker(payload: Ping | Seen, metadata: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, Ping):
        return HandlerResponse(payload, to="traced")
    return HandlerResponse.respond(payload)


async def report_trace_context(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    context = trace.get_current_span().get_span_context()
    return HandlerResponse.respond(Seen(f"{context.trace_id:032x}-{context.span_id:016x}"))
