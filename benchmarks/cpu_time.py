"""CPU time per unit of work, the steadier measure on a shared machine: a floor hop, a pump round trip, a buffer item.

Wall-clock rates swing with whatever else the two cores run; the CPU time this
process spends per unit swings far less, so it is what the hot-path work was
steered by (docs/hot-path-notes.md). Each repeat measures the three one after
the other on one warm pump, and the medians are printed::

    .venv/bin/python -m benchmarks.cpu_time 5
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import uvloop

from benchmarks.floor import floor_rate
from benchmarks.measure import CLIENTS, closed_loop, envelope, orders_organism, running
from benchmarks.workload import sample_order
from xml_pipeline.collector import settle_for_serving
from xml_pipeline.primitives import BufferComplete, BufferStart


async def cpu_microseconds(repeats: int, hops: int = 10_000, items: int = 10_000) -> dict[str, float]:
    """Median CPU microseconds per floor hop, per pump round trip and per buffer item."""
    order = envelope(sample_order(), "orders")
    work = [f"<Work><rounds>{index % 3}</rounds></Work>" for index in range(items)]
    start = BufferStart(target="cruncher", items=work, max_in_flight=256, timeout_seconds=600)
    buffer = envelope(start, "system.buffer")
    spent: dict[str, list[float]] = {"floor hop": [], "pump round trip": [], "buffer item": []}
    async with running(orders_organism()) as pump:
        await closed_loop(pump, order, min(hops, 2000), CLIENTS)  # warm-up
        for _ in range(repeats):
            began = time.process_time()
            floor_rate(order, hops)
            spent["floor hop"].append((time.process_time() - began) / hops * 1e6)
            began = time.process_time()
            await closed_loop(pump, order, hops, CLIENTS)
            spent["pump round trip"].append((time.process_time() - began) / hops * 1e6)
            began = time.process_time()
            reply = await (await pump.inject(buffer)).next_reply(600)
            if not isinstance(reply.payload, BufferComplete) or reply.payload.successful != items:
                raise RuntimeError(f"buffer benchmark failed: {reply.payload!r:.300}")
            spent["buffer item"].append((time.process_time() - began) / items * 1e6)
    return {name: statistics.median(values) for name, values in spent.items()}


def main() -> int:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    logging.getLogger("xml_pipeline").setLevel(logging.CRITICAL)
    settle_for_serving()  # measure what a daemon runs: its collector settings too
    spent = uvloop.run(cpu_microseconds(repeats))
    floor, hop, item = spent["floor hop"], spent["pump round trip"], spent["buffer item"]
    print(f"CPU per unit, median of {repeats}: floor hop {floor:.1f} us; pump round trip {hop:.1f} us")
    print(f"  (floor / pump {floor / hop:.2f}); buffer item {item:.1f} us (so at most {1e6 / item:,.0f} items/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
