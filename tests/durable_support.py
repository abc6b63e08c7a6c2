"""Starting a durable engine on a real redis-server for a test, and leaving nothing of it behind."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis

from tests.redis_server import RedisServer
from xml_pipeline.cluster.engine import DurableEngine, DurableSettings
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.organism import Listener, Organism, PumpLimits


@contextlib.asynccontextmanager
async def started(
    redis_server: RedisServer,
    prefix: str,
    listeners: list[Listener],
    *,
    limits: PumpLimits | None = None,
    settings: DurableSettings | None = None,
) -> AsyncIterator[DurableEngine]:
    """A durable engine on its own key prefix, stopped and its keys removed on the way out."""
    backend = RedisBackend(redis_server.url, prefix=prefix, fail_fast_seconds=None)
    organism = Organism.of(prefix.rstrip(":"), listeners, limits)
    durable = DurableEngine(organism, backend, settings or DurableSettings(reply_retention_seconds=30))
    await durable.start()
    try:
        yield durable
    finally:
        await durable.stop(drain_timeout=5)
        client = redis.Redis.from_url(redis_server.url)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.unlink(key)
        client.close()
        backend.close()
