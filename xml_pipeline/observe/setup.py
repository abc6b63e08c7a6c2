"""What a daemon attaches to its engine, from organism.yaml's ``observe`` section, and their lifetime.

- the live tail's hub and the graph's totals, always (each costs a loop over
  nothing, or a few dictionary updates, per event);
- a trace store unless ``trace_retention_seconds`` is 0: in Redis with the
  redis backend (any daemon serves any trace), else in this process;
- OpenTelemetry spans with ``opentelemetry: true``.

The Redis store's writer is a task that :meth:`Observing.start` starts and
:meth:`Observing.stop` ends after a last flush, so it lives exactly as long as
the engine it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.observe.events import Observation
from xml_pipeline.observe.graph import GraphStats
from xml_pipeline.observe.hub import EventHub
from xml_pipeline.observe.memory_store import MemoryTraceStore
from xml_pipeline.observe.redis_store import RedisTraceStore
from xml_pipeline.observe.settings import ObserveSettings
from xml_pipeline.organism import Organism

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("xml_pipeline.observe")

STOP_SECONDS = 5.0
"""How long stopping waits for the last trace records and spans to go out."""


class Observing:
    def __init__(self, organism: Organism, backend: SharedBackend, observation: Observation) -> None:
        self.settings = ObserveSettings.from_settings(organism.settings.get("observe", {}))
        self.hub = EventHub(self.settings.tail_buffer, self.settings.tail_max_watchers)
        self.graph = GraphStats()
        observation.attach(self.hub)
        observation.attach(self.graph)
        self.store: MemoryTraceStore | RedisTraceStore | None = None
        if self.settings.tracing:
            if isinstance(backend, RedisBackend):
                self.store = RedisTraceStore(
                    backend.spec.url,
                    backend.prefix,
                    backend.ttl,
                    self.settings,
                    socket_timeout=backend.socket_timeout,
                )
            else:
                self.store = MemoryTraceStore(self.settings)
            observation.attach(self.store)
        self.provider: TracerProvider | None = None
        if self.settings.opentelemetry:
            from xml_pipeline.observe.otel import OtelSpans, provider_from_environment

            self.provider = provider_from_environment(organism.name)
            observation.attach_spans(OtelSpans(self.provider))
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if isinstance(self.store, RedisTraceStore):
            self._writer = asyncio.create_task(self.store.run(), name="xml-pipeline-trace-writer")

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if isinstance(self.store, RedisTraceStore):
            try:
                async with asyncio.timeout(STOP_SECONDS):
                    await self.store.close()
            except TimeoutError:
                log.warning("the last trace records did not reach redis within %gs", STOP_SECONDS)
        if self.provider is not None:
            provider = self.provider
            try:
                async with asyncio.timeout(STOP_SECONDS):
                    await asyncio.to_thread(provider.force_flush, int(STOP_SECONDS * 1000))
            except TimeoutError:
                log.warning("the last spans were not exported within %gs", STOP_SECONDS)
            provider.shutdown()

    def sweep(self) -> None:
        """Free expired traces even when nobody records or reads (the daemon's housekeeping)."""
        if isinstance(self.store, MemoryTraceStore):
            self.store.expire()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"tracing": self.store is not None, "opentelemetry": self.provider is not None}
        stats.update(self.hub.stats())
        if self.store is not None:
            stats.update(self.store.stats())
        return stats
