"""OpenTelemetry: one trace per conversation, hop and handler spans nested by cause, across a worker
process too, and a caller's traceparent joined, in process and through a real daemon's OTLP export."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.daemon_support import running_daemon, wait_until, write_organism
from tests.observe_handlers import Seen, report_trace_context, via_worker
from tests.support import Ping
from workers.hello import Greeting
from xml_pipeline.observe.events import Observation
from xml_pipeline.observe.otel import OtelSpans
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.testing import running

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture
def exported() -> Iterator[tuple[InMemorySpanExporter, Observation]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observation = Observation()
    observation.attach_spans(OtelSpans(provider))
    yield exporter, observation
    provider.shutdown()


def chain(spans: tuple[ReadableSpan, ...]) -> list[str]:
    """Span names from the root down, following each span's only child."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)
    (root,) = children[None]
    names = [root.name]
    while children.get(root.context.span_id):
        (root,) = children[root.context.span_id]
        names.append(root.name)
    return names


async def test_one_conversation_is_one_trace_of_hop_and_handler_spans(
    example_organism: Organism, exported: tuple[InMemorySpanExporter, Observation]
) -> None:
    exporter, observation = exported
    async with running(example_organism) as pump:
        pump.observe = observation
        await (await pump.inject_payload(Greeting("Ada"), "greeter")).collect(5)
    spans = exporter.get_finished_spans()
    assert len({span.context.trace_id for span in spans}) == 1
    assert chain(spans) == [
        "console → greeter",
        "handle greeter",
        "greeter → shouter",
        "handle shouter",
        "shouter → exclaimer",
        "handle exclaimer",
        "exclaimer → shouter",
        "handle shouter",
        "shouter → greeter",
        "handle greeter",
        "greeter → console",
    ]
    first = next(span for span in spans if span.name == "console → greeter")
    assert first.attributes is not None
    assert first.attributes["xml_pipeline.payload_type"] == "workers.hello:Greeting"
    assert first.attributes["xml_pipeline.to"] == "greeter"
    assert {"xml_pipeline.thread", "xml_pipeline.conversation"} <= set(first.attributes)


async def test_the_trace_continues_in_a_worker_process(exported: tuple[InMemorySpanExporter, Observation]) -> None:
    exporter, observation = exported
    organism = Organism.of(
        "otel",
        [
            Listener("front", [Ping, Seen], via_worker, peers=["traced"]),
            Listener("traced", [Ping], report_trace_context, cpu_bound=True, peers=[]),
        ],
    )
    organism.settings = {"process_pool": {"workers": 1}}
    async with running(organism) as pump:
        pump.observe = observation
        reply = await (await pump.inject_payload(Ping("x"), "front")).next_reply(20)
    spans = exporter.get_finished_spans()
    assert len({span.context.trace_id for span in spans}) == 1
    assert chain(spans)[:5] == ["console → front", "handle front", "front → traced", "handle traced", "traced → front"]
    worker_side = next(span for span in spans if span.name == "handle traced")
    assert isinstance(reply.payload, Seen)
    assert reply.payload.context == f"{worker_side.context.trace_id:032x}-{worker_side.context.span_id:016x}"


async def test_an_error_is_on_its_handler_span(exported: tuple[InMemorySpanExporter, Observation]) -> None:
    exporter, observation = exported
    organism = Organism.of("otel", [Listener("failing", [Ping], _explode, peers=[])])
    async with running(organism) as pump:
        pump.observe = observation
        await (await pump.inject_payload(Ping("x"), "failing")).collect(5)
    (handler,) = [span for span in exporter.get_finished_spans() if span.name == "handle failing"]
    assert handler.attributes is not None
    assert handler.attributes["xml_pipeline.error_code"] == "handler-error"
    assert not handler.status.is_ok


async def _explode(payload: Ping, metadata: object) -> None:
    raise ValueError("boom")


async def test_a_callers_traceparent_is_joined(
    example_organism: Organism, exported: tuple[InMemorySpanExporter, Observation]
) -> None:
    exporter, observation = exported
    async with running(example_organism) as pump:
        pump.observe = observation
        with Observation.joining(TRACEPARENT):
            submission = await pump.inject_payload(Greeting("Ada"), "greeter")
        await submission.collect(5)
    spans = exporter.get_finished_spans()
    assert {f"{span.context.trace_id:032x}" for span in spans} == {CALLER_TRACE}
    (root,) = [span for span in spans if span.name == "console → greeter"]
    assert root.parent is not None
    assert f"{root.parent.span_id:016x}" == CALLER_SPAN


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


def test_the_daemon_exports_over_otlp_and_joins_the_post_traceparent(tmp_path: Path) -> None:
    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    serving = threading.Thread(target=collector.serve_forever, daemon=True)
    serving.start()
    organism = write_organism(tmp_path / "organism.yaml", pump="observe:\n  opentelemetry: true\n")
    environment = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{collector.server_port}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "greetings",
    }
    try:
        with running_daemon(organism, env=environment) as daemon:
            posted = subprocess.run(
                ["curl", "-sS", "--unix-socket", str(daemon.socket_path), "-H", f"traceparent: {TRACEPARENT}",
                 "--data-binary", "@-", "http://daemon/messages?wait=end"],
                input=b'<message xmlns="https://xml-pipeline.org/ns/envelope/v1"><meta><from>console</from>'
                b"<to>greeter</to><thread>3f2a9c1e-0b7d-4e7a-9a51-6d2b8f1c0e42</thread></meta>"
                b'<Greeting xmlns=""><name>Ada</name></Greeting></message>',
                capture_output=True,
                timeout=30,
                check=True,
            )  # fmt: skip
            assert b"HELLO, ADA!" in posted.stdout
            assert wait_until(lambda: len(_spans(_Collector.received)) >= 11, timeout=15)
    finally:
        collector.shutdown()
        collector.server_close()
    spans = _spans(_Collector.received)
    assert {span.trace_id.hex() for span in spans} == {CALLER_TRACE}
    (root,) = [span for span in spans if span.name == "console → greeter"]
    assert root.parent_span_id.hex() == CALLER_SPAN
    services = {
        attribute.value.string_value
        for request in _Collector.received
        for resource in request.resource_spans
        for attribute in resource.resource.attributes
        if attribute.key == "service.name"
    }
    assert services == {"greetings"}


def _spans(requests: list[ExportTraceServiceRequest]) -> list[Any]:
    return [
        span
        for request in list(requests)
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
