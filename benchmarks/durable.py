"""9. delivery at-least-once: the durable engine against the pumps it replaces, Redis's own CPU per hop,
and two daemons against one.

- In one process, three engines on the same Order workload, measured pair by
  pair: the memory pump (the baseline the issue names), the Redis pump at most
  once, and the durable engine (every hop an entry in Redis Streams, committed
  with its acknowledgement).
- Redis's CPU per hop: ``used_cpu_user + used_cpu_sys`` from ``INFO cpu``
  across a durable run, divided by the hops handled.
- Real daemon subprocesses over their sockets: one daemon, then two, the same
  closed loop of clients; on a 2-core machine shared with Redis and the client
  itself, the second daemon has little CPU to add, and the figure says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import redis

from benchmarks import redis_instructions
from benchmarks.measure import Result, closed_loop, envelope, orders_organism, running
from benchmarks.paired import Paired, interleaved
from benchmarks.workload import sample_order
from xml_pipeline.cluster.engine import DurableEngine, DurableSettings
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.message_bus.engine import Accepted

CLIENTS = 64


@contextlib.asynccontextmanager
async def durable_engine(url: str) -> AsyncIterator[DurableEngine]:
    backend = RedisBackend(url, prefix=f"bench-{uuid.uuid4().hex[:6]}:", fail_fast_seconds=None)
    organism = orders_organism()
    organism.settings = {**organism.settings, "backend": {"type": "redis", "delivery": "at-least-once"}}
    engine = DurableEngine(organism, backend, DurableSettings(reply_retention_seconds=60))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(drain_timeout=30)
        backend.close()


async def durable_loop(engine: DurableEngine, raw: bytes, count: int, concurrency: int) -> float:
    """Round trips per second: each client stores a message durably and waits for its conversation's end."""
    remaining = count

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            accepted = await engine.accept(raw)
            if not isinstance(accepted, Accepted):
                raise RuntimeError(f"benchmark message refused: {accepted.detail}")
            collected = await engine.collect(accepted.thread, "end", 60)
            if collected is None or not collected.ended or not collected.replies:
                raise RuntimeError("benchmark conversation did not end with its reply")

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(client())
    return count / (time.perf_counter() - started)


REFERENCE_SETS = 20_000
_REFERENCE_VALUE = b"x" * 1024


def redis_reference_us(url: str, count: int = REFERENCE_SETS) -> float:
    """Redis CPU (us) per ``SET`` of 1 KB sent in pipelines of 100: a unit of Redis work on this machine.

    Machines differ by several times in what one Redis core does (the per-hop
    figure went from 47-54 us to 113-136 us between two machines on the same
    code), so the per-hop figure is also given in these units, to compare machines by.
    """
    client = redis.Redis.from_url(url)
    try:
        before = redis_cpu_seconds(url)
        for start in range(0, count, 100):
            pipe = client.pipeline(transaction=False)
            for i in range(start, start + 100):
                pipe.set(f"bench-reference:{i % 1000}", _REFERENCE_VALUE)
            pipe.execute()
        spent = redis_cpu_seconds(url) - before
        client.unlink(*(f"bench-reference:{i}" for i in range(1000)))
        return spent * 1e6 / count
    finally:
        client.close()


def redis_cpu_seconds(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        cpu = client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    finally:
        client.close()


async def durable_throughput(count: int, repeats: int, daemon_count: int, instructions_of: int = 0) -> Result:
    """Measurement 9; with ``instructions_of``, also the instructions Redis runs per one-hop conversation over
    that many (:mod:`benchmarks.redis_instructions`, on a Redis of its own under callgrind)."""
    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    raw = envelope(sample_order(), "orders")
    try:
        backend = RedisBackend(server.url, prefix="bench-amo:")
        async with (
            running(orders_organism()) as memory,
            running(orders_organism(), backend) as at_most_once,
            durable_engine(server.url) as durable,
        ):
            await closed_loop(memory, raw, min(count, 500), CLIENTS)
            await closed_loop(at_most_once, raw, min(count, 500), CLIENTS)
            await durable_loop(durable, raw, min(count, 500), CLIENTS)
            redis_cpu = 0.0

            async def measured_durable() -> float:
                """A durable run, and the Redis CPU it took (the other engines are idle meanwhile)."""
                nonlocal redis_cpu
                before = redis_cpu_seconds(server.url)
                rate = await durable_loop(durable, raw, count, CLIENTS)
                redis_cpu += redis_cpu_seconds(server.url) - before
                return rate

            figures = await interleaved(
                repeats,
                {
                    "memory": lambda: closed_loop(memory, raw, count, CLIENTS),
                    "at-most-once": lambda: closed_loop(at_most_once, raw, count, CLIENTS),
                    "at-least-once": measured_durable,
                },
            )
            relayed = await relay_cost(server.url, durable, count, repeats)
            reference = redis_reference_us(server.url)
        backend.close()
        scaling = await daemon_scaling(server.url, max(count // 4, 100), repeats, daemon_count)
    finally:
        server.close()
    versus_memory = Paired.of("at-least-once", figures["at-least-once"], "memory pump", figures["memory"])
    versus_redis = Paired.of(
        "at-least-once", figures["at-least-once"], "at-most-once Redis pump", figures["at-most-once"]
    )
    instructions, instructions_note = await redis_instructions.counted(
        redis_instructions.instructions_per_conversation, instructions_of
    )
    redis_us_per_hop = redis_cpu * 1e6 / (count * repeats)
    per_relayed_hop = relayed / RELAY_HOPS
    added_hop = (relayed - redis_us_per_hop) / (RELAY_HOPS - 1)
    return Result(
        "9. delivery at-least-once (durable engine, Redis Streams) vs the memory and at-most-once Redis pumps",
        f"{versus_memory.subject_figure.text(',.0f')} hops/s; Redis CPU {redis_us_per_hop:.0f} us per hop"
        f" (accept, commit and reply reads) = {redis_us_per_hop / reference:.1f} pipelined 1 KB SETs"
        f" ({reference:.2f} us each here); {instructions_note} per one-hop conversation; "
        f"{daemon_count} daemons / 1: {scaling.ratio.text('.2f')}",
        f"memory pump {versus_memory.baseline_figure.text(',.0f')} hops/s; "
        f"at-most-once Redis {versus_redis.baseline_figure.text(',.0f')} hops/s; Redis CPU in conversations of "
        f"{RELAY_HOPS} hops: {per_relayed_hop:.0f} us per hop, {added_hop:.0f} us for each hop past the first",
        "median >= 0.5 x the memory pump; Redis CPU <= 40 us per hop (in one-hop conversations)",
        versus_memory.ratio.median >= 0.5 and redis_us_per_hop <= 40,
        {"memory": versus_memory, "at-most-once": versus_redis, "daemons": scaling},
        {
            "redis_cpu_us_per_hop": redis_us_per_hop,
            "redis_cpu_us_per_conversation_of_3_hops": relayed,
            "redis_cpu_us_per_added_hop": added_hop,
            "redis_cpu_us_per_reference_set": reference,
            "redis_instructions_per_conversation": instructions,
        },
    )


RELAY_HOPS = 3
"""client -> relay -> orders -> relay (its response), then the reply to the client."""


async def relay_cost(url: str, engine: DurableEngine, count: int, repeats: int) -> float:
    """Redis CPU (us) per conversation of RELAY_HOPS hops: the one-hop figure's open, end and reply, plus
    the hops a longer conversation adds, so the two together give the cost of a hop by itself."""
    raw = envelope(sample_order(), "relay")
    await durable_loop(engine, raw, min(count, 500), CLIENTS)
    spent = 0.0
    for _ in range(repeats):
        before = redis_cpu_seconds(url)
        await durable_loop(engine, raw, count, CLIENTS)
        spent += redis_cpu_seconds(url) - before
    return spent * 1e6 / (count * repeats)


# ---------------------------------------------------------------- several daemons


@contextlib.contextmanager
def daemons(url: str, count: int) -> Iterator[list[Path]]:
    from tests.daemon_support import running_daemon, short_directory

    with short_directory() as directory, contextlib.ExitStack() as stack:
        organism = directory / "organism.yaml"
        organism.write_text(
            "organism:\n  name: bench\npump:\n  max_in_flight: 1024\n  queue_size: 8192\n"
            f"backend:\n  type: redis\n  redis_url: {url}\n  redis_prefix: 'bench-d{uuid.uuid4().hex[:6]}:'\n"
            "  delivery: at-least-once\n"
            "listeners:\n  - name: orders\n    payload_class: benchmarks.workload.Order\n"
            "    handler: benchmarks.workload.receipt\n    ingress: true\n    max_concurrency: 1024\n"
        )
        yield [stack.enter_context(running_daemon(organism)).socket_path for _ in range(count)]


async def http_loop(sockets: list[Path], raw: bytes, count: int, concurrency: int) -> float:
    """Round trips per second over the daemons' sockets, clients spread over them."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) for path in sockets]
    remaining = count

    async def client(index: int) -> None:
        nonlocal remaining
        session = sessions[index % len(sessions)]
        while remaining > 0:
            remaining -= 1
            async with session.post("http://daemon/messages?wait=end&timeout=60", data=raw) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"benchmark message refused: {await answer.text()}")

    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for index in range(concurrency):
                group.create_task(client(index))
        return count / (time.perf_counter() - started)
    finally:
        for session in sessions:
            await session.close()


async def daemon_scaling(url: str, count: int, repeats: int, daemon_count: int) -> Paired:
    """One organism of one daemon and one of ``daemon_count`` (each its own prefix), measured pair by pair."""
    raw = envelope(sample_order(), "orders")
    with daemons(url, 1) as alone, daemons(url, daemon_count) as together:
        for sockets in (alone, together):
            await http_loop(sockets, raw, min(count, 200), CLIENTS)
        figures = await interleaved(
            repeats,
            {
                "one": lambda: http_loop(alone, raw, count, CLIENTS),
                "several": lambda: http_loop(together, raw, count, CLIENTS),
            },
        )
    return Paired.of(f"{daemon_count} daemons", figures["several"], "1 daemon", figures["one"])
