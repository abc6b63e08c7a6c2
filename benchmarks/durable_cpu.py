"""CPU per one-hop round trip of the durable engine: the daemon process's and Redis's, the steadier measures.

Wall-clock rates on a shared 2-core machine swing with the neighbours; the
CPU the engine's process and ``redis-server`` each spend per round trip swing
far less, so this is what the durable engine's work was steered by
(docs/benchmarks.md, measurement 11). One engine on a fresh ``redis-server``,
the Order workload, 64 clients; the medians of the repeats are printed::

    .venv/bin/python -m benchmarks.durable_cpu 5
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import uvloop

from benchmarks.durable import CLIENTS, durable_engine, durable_loop, redis_cpu_seconds
from benchmarks.measure import envelope
from benchmarks.workload import sample_order
from xml_pipeline.collector import settle_for_serving


async def durable_cpu_microseconds(repeats: int, conversations: int = 3000) -> dict[str, float]:
    """Median CPU microseconds per one-hop round trip: the engine's process, and Redis."""
    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    order = envelope(sample_order(), "orders")
    spent: dict[str, list[float]] = {"engine": [], "redis": []}
    try:
        async with durable_engine(server.url) as engine:
            await durable_loop(engine, order, min(conversations, 1000), CLIENTS)  # warm-up
            for _ in range(repeats):
                redis_before, began = redis_cpu_seconds(server.url), time.process_time()
                await durable_loop(engine, order, conversations, CLIENTS)
                spent["engine"].append((time.process_time() - began) / conversations * 1e6)
                spent["redis"].append((redis_cpu_seconds(server.url) - redis_before) / conversations * 1e6)
    finally:
        server.close()
    return {name: statistics.median(values) for name, values in spent.items()}


def main() -> int:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    logging.getLogger("xml_pipeline").setLevel(logging.CRITICAL)
    settle_for_serving()  # measure what a daemon runs: its collector settings too
    spent = uvloop.run(durable_cpu_microseconds(repeats))
    engine, redis = spent["engine"], spent["redis"]
    print(f"CPU per one-hop round trip, median of {repeats}: engine {engine:.0f} us; redis {redis:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
