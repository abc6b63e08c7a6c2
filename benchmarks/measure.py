"""The seven measurements of `make bench`. Each returns a Result: a figure, its baseline
measured in the same run, and the target it is held to."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import workload
from benchmarks.floor import floor_rate
from benchmarks.workload import Order, Work, sample_order
from xml_pipeline.config.loader import load_organism
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message.envelope import serialize_envelope
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.primitives import BufferComplete, BufferStart

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
BENCH_LIMITS = PumpLimits(
    queue_size=8192, max_in_flight=1024, max_message_bytes=64 * 1024 * 1024, max_conversations=1_000_000
)


@dataclass
class Result:
    name: str
    figure: str
    baseline: str
    ratio: float | None
    target: str
    met: bool
    details: dict[str, Any] = field(default_factory=dict)


def envelope(payload: Any, to: str) -> bytes:
    return serialize_envelope("console", to, str(uuid.uuid4()), codec_for(type(payload)).to_element(payload))


def orders_organism(*, cpu_bound: bool = False, workers: int = 1) -> Organism:
    listeners = [
        Listener("orders", [Order], workload.receipt, max_concurrency=1024),
        Listener("cruncher", [Work], workload.crunch, cpu_bound=cpu_bound, max_concurrency=1024, timeout_seconds=120),
    ]
    organism = Organism.of("bench", listeners, BENCH_LIMITS)
    organism.settings = {"process_pool": {"workers": workers}}
    return organism


async def closed_loop(pump: Pump, raw: bytes, count: int, concurrency: int) -> float:
    """Round trips per second with ``concurrency`` clients each sending one message at a time."""
    remaining = count

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            submission = await pump.inject(raw)
            reply = await submission.next_reply(60)
            if reply.is_error:
                raise RuntimeError(f"benchmark message failed: {reply.payload}")

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(client())
    return count / (time.perf_counter() - started)


async def with_pump(
    organism: Organism, work: Callable[[Pump], Awaitable[T]], backend: SharedBackend | None = None
) -> T:
    pump = Pump(organism, backend=backend)
    await pump.start()
    try:
        return await work(pump)
    finally:
        await pump.stop(drain_timeout=30)


# ---------------------------------------------------------------- 1. hop throughput


async def hop_throughput(count: int, repeats: int) -> Result:
    """Floor and pump take turns, ``repeats`` times; the best of each is compared,
    so a burst of load from a neighbour on a shared machine hits both alike."""
    raw = envelope(sample_order(), "orders")
    organism = orders_organism()

    async def measure(pump: Pump) -> tuple[list[float], list[float]]:
        await closed_loop(pump, raw, min(count, 2000), 128)  # warm-up
        floors: list[float] = []
        rates: list[float] = []
        for _ in range(repeats):
            floors.append(floor_rate(raw, count))
            rates.append(await closed_loop(pump, raw, count, 128))
        return floors, rates

    floors, rates = await with_pump(organism, measure)
    floor, rate = max(floors), max(rates)
    ratio = rate / floor
    return Result(
        "1. hop throughput (in-process, memory, full validation)",
        f"{rate:,.0f} hops/s (best of {repeats})",
        f"lxml floor {floor:,.0f} hops/s ({len(raw)} B envelope, best of {repeats})",
        ratio,
        "ratio >= 0.5",
        ratio >= 0.5,
        {"pump_hops_per_s": rate, "floor_hops_per_s": floor, "envelope_bytes": len(raw), "runs": [floors, rates]},
    )


# ---------------------------------------------------------------- 2. latency


async def latency(max_rate: float, floor_hop_rate: float, seconds: float, repeats: int) -> Result:
    """``repeats`` windows of ``seconds`` each; the window with the lowest p99 is
    reported (all of them are in the details), since a neighbour's burst of load
    on a shared machine shows up as a tail that is not the pump's."""
    windows = [await _latency_window(max_rate, seconds) for _ in range(repeats)]
    samples = min(windows, key=lambda window: _percentile(window, 0.99))
    p50, p99, p999 = (_percentile(samples, fraction) for fraction in (0.5, 0.99, 0.999))
    rate = max_rate / 2
    return Result(
        "2. round-trip latency at 50% of max rate",
        f"p50 {p50:,.0f} us, p99 {p99:,.0f} us, p99.9 {p999:,.0f} us (best p99 of {repeats} windows)",
        f"offered {rate:,.0f} msg/s (half of max {max_rate:,.0f}); a floor hop takes {1e6 / floor_hop_rate:,.0f} us",
        p99 / 1000,
        "p99 <= 1000 us",
        p99 <= 1000,
        {
            "p50_us": p50,
            "p99_us": p99,
            "p999_us": p999,
            "offered_rate": rate,
            "samples": len(samples),
            "p99_of_each_window_us": [_percentile(window, 0.99) for window in windows],
        },
    )


def _percentile(sorted_samples: list[float], fraction: float) -> float:
    return sorted_samples[min(len(sorted_samples) - 1, int(fraction * len(sorted_samples)))] * 1e6


async def _latency_window(max_rate: float, seconds: float) -> list[float]:
    raw = envelope(sample_order(), "orders")
    rate = max_rate / 2
    organism = orders_organism()

    async def measure(pump: Pump) -> list[float]:
        samples: list[float] = []
        loop = asyncio.get_running_loop()

        async def one() -> None:
            sent = time.perf_counter()
            submission = await pump.inject(raw)
            await submission.next_reply(60)
            samples.append(time.perf_counter() - sent)

        await closed_loop(pump, raw, 1000, 32)  # warm-up
        started = loop.time()
        sent = 0
        async with asyncio.TaskGroup() as group:
            while (elapsed := loop.time() - started) < seconds:
                due = int(elapsed * rate) - sent
                for _ in range(due):
                    group.create_task(one())
                sent += max(due, 0)
                await asyncio.sleep(0.0005)
        return samples

    return sorted(await with_pump(organism, measure))


# ---------------------------------------------------------------- 3. redis


async def redis_throughput(count: int, memory_rate: float, repeats: int) -> Result:
    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    backend = RedisBackend(server.url, prefix="bench:")
    try:
        raw = envelope(sample_order(), "orders")

        async def measure(pump: Pump) -> float:
            await closed_loop(pump, raw, min(count, 500), 64)
            return max([await closed_loop(pump, raw, count, 64) for _ in range(repeats)])

        rate = await with_pump(orders_organism(), measure, backend)
        leftover = len(backend.keys())
    finally:
        backend.close()
        server.close()
    return Result(
        "3. hop throughput on a local redis-server (registry + history in Redis)",
        f"{rate:,.0f} hops/s (best of {repeats})",
        f"same pump on memory {memory_rate:,.0f} hops/s",
        rate / memory_rate,
        ">= 10,000 hops/s",
        rate >= 10_000,
        {"redis_hops_per_s": rate, "keys_left": leftover},
    )


# ---------------------------------------------------------------- 4. process pool


def calibrate_rounds(target_seconds: float = 0.005) -> int:
    rounds = 10_000
    started = time.perf_counter()
    workload.burn(rounds)
    return max(1, int(rounds * target_seconds / (time.perf_counter() - started)))


async def pool_scaling(count: int, repeats: int) -> Result:
    rounds = calibrate_rounds()
    heavy = envelope(Work(rounds), "cruncher")
    trivial = envelope(Work(0), "cruncher")

    def throughput(workers: int) -> Callable[[Pump], Awaitable[float]]:
        async def measure(pump: Pump) -> float:
            await closed_loop(pump, heavy, 4 * workers, 4 * workers)  # warm every worker
            return max([await closed_loop(pump, heavy, count, 8) for _ in range(repeats)])

        return measure

    rates = {
        workers: await with_pump(orders_organism(cpu_bound=True, workers=workers), throughput(workers))
        for workers in (1, 2)
    }

    async def sequential_seconds(pump: Pump) -> float:
        await closed_loop(pump, trivial, 200, 1)
        return 1 / max([await closed_loop(pump, trivial, 1000, 1) for _ in range(repeats)])

    offloaded = await with_pump(orders_organism(cpu_bound=True, workers=1), sequential_seconds)
    in_process = await with_pump(orders_organism(cpu_bound=False), sequential_seconds)
    overhead_us = (offloaded - in_process) * 1e6
    scaling = rates[2] / rates[1]
    bare = await bare_executor(rounds, count, repeats)
    return Result(
        "4. process pool scaling (5 ms pure-Python handler)",
        f"2 workers {rates[2]:,.1f} msg/s ({scaling:.2f}x one); overhead {overhead_us:,.0f} us/msg",
        f"1 worker {rates[1]:,.1f} msg/s; in-process round trip {in_process * 1e6:,.0f} us; "
        f"bare ProcessPoolExecutor: 2 workers {bare['scaling']:.2f}x one, "
        f"empty call {bare['round_trip_us']:,.0f} us",
        scaling,
        "2 workers >= 1.7x one; overhead <= 300 us",
        scaling >= 1.7 and overhead_us <= 300,
        {
            "rounds": rounds,
            "rate_1": rates[1],
            "rate_2": rates[2],
            "scaling": scaling,
            "overhead_us": overhead_us,
            "bare_scaling": bare["scaling"],
            "bare_round_trip_us": bare["round_trip_us"],
        },
    )


async def bare_executor(rounds: int, count: int, repeats: int) -> dict[str, float]:
    """What the machine and ProcessPoolExecutor allow by themselves: the same
    burn with 1 and 2 workers, and the round trip of an empty call."""
    loop = asyncio.get_running_loop()
    rates: dict[int, float] = {}
    round_trip = 0.0
    for workers in (1, 2):
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            await asyncio.gather(*(loop.run_in_executor(executor, workload.burn, 1) for _ in range(2 * workers)))
            for _ in range(repeats):
                started = time.perf_counter()
                await asyncio.gather(*(loop.run_in_executor(executor, workload.burn, rounds) for _ in range(count)))
                rates[workers] = max(rates.get(workers, 0.0), count / (time.perf_counter() - started))
            if workers == 1:
                calls = 1000
                for _ in range(repeats):
                    started = time.perf_counter()
                    for _ in range(calls):
                        await loop.run_in_executor(executor, workload.burn, 0)
                    seconds = (time.perf_counter() - started) / calls * 1e6
                    round_trip = min(round_trip, seconds) if round_trip else seconds
        finally:
            executor.shutdown(wait=True)
    return {"scaling": rates[2] / rates[1], "round_trip_us": round_trip}


async def buffer_throughput(items: int, hop_rate: float, repeats: int) -> Result:
    work = [f"<Work><rounds>{i % 3}</rounds></Work>" for i in range(items)]
    raw = envelope(BufferStart(target="cruncher", items=work, max_in_flight=256, timeout_seconds=600), "system.buffer")

    async def measure(pump: Pump) -> float:
        best = 0.0
        for _ in range(repeats):
            began = time.perf_counter()
            reply = await (await pump.inject(raw)).next_reply(600)
            elapsed = time.perf_counter() - began
            if not isinstance(reply.payload, BufferComplete) or reply.payload.successful != items:
                raise RuntimeError(f"buffer benchmark failed: {reply.payload!r:.300}")
            best = max(best, items / elapsed)
        return best

    rates = {
        kind: await with_pump(orders_organism(cpu_bound=cpu_bound, workers=2), measure)
        for kind, cpu_bound in (("in-process", False), ("cpu_bound", True))
    }
    met = rates["in-process"] >= 15_000 and rates["cpu_bound"] >= 5_000
    return Result(
        f"5. buffer fan-out/fan-in of {items:,} items",
        f"in-process {rates['in-process']:,.0f} items/s; cpu_bound (2 workers) {rates['cpu_bound']:,.0f} items/s",
        f"pump round trips {hop_rate:,.0f}/s",
        rates["in-process"] / hop_rate,
        "in-process >= 15,000 items/s; cpu_bound >= 5,000 items/s",
        met,
        {"in_process_items_per_s": rates["in-process"], "cpu_bound_items_per_s": rates["cpu_bound"]},
    )


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def memory_growth(messages: int) -> Result:
    organism = load_organism(ROOT / "organism.yaml")
    organism.limits = BENCH_LIMITS
    from workers.hello import Greeting

    raw = envelope(Greeting("memory", 2), "greeter")
    hops_per_conversation = 6
    conversations = messages // hops_per_conversation

    async def measure(pump: Pump) -> tuple[float, float, int, int]:
        warm = max(conversations // 10, 1000)
        await closed_loop(pump, raw, warm, 128)
        gc.collect()
        before = resident_mb()
        await closed_loop(pump, raw, conversations, 128)
        gc.collect()
        after = resident_mb()
        return before, after, len(pump.registry), len(pump.buffer.list_threads())

    before, after, threads, buffers = await with_pump(organism, measure)
    growth = after - before
    return Result(
        f"6. memory over {conversations * hops_per_conversation:,} messages (example organism)",
        f"RSS grew {growth:+.1f} MB; live threads {threads}, buffers {buffers}",
        f"RSS after warm-up {before:.1f} MB",
        None,
        "growth <= 20 MB; threads back to 0",
        growth <= 20 and threads == 0 and buffers == 0,
        {"rss_before_mb": before, "rss_after_mb": after, "threads": threads},
    )


# ---------------------------------------------------------------- 7. bad input


BAD_INPUTS = {
    "malformed": b"<message><meta><from>console</from><to>orders",
    "xxe": b'<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]><m>&x;</m>',
    "billion laughs": b'<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
    + b"".join(f'<!ENTITY a{i} "{"&a;" * 10 if i == 1 else f"&a{i - 1};" * 10}">'.encode() for i in range(1, 10))
    + b"]><l>&a9;</l>",
    "too deep": b"<a>" * 200 + b"</a>" * 200,
}


async def bad_input_cost(count: int, valid_rate: float) -> Result:
    valid_us = 1e6 / valid_rate
    raw_order = envelope(sample_order(), "orders")
    inputs = dict(BAD_INPUTS)
    inputs["schema violation"] = raw_order.replace(b"<priority>3</priority>", b"<priority>high</priority>")
    inputs["unknown target"] = raw_order.replace(b"<xp:to>orders</xp:to>", b"<xp:to>nobody</xp:to>")
    costs: dict[str, float] = {}

    async def measure(pump: Pump) -> None:
        for name, raw in inputs.items():
            await pump.inject(raw)
            started = time.perf_counter()
            for _ in range(count):
                submission = await pump.inject(raw)
                reply = await submission.next_reply(10)
                if not reply.is_error:
                    raise RuntimeError(f"{name} was accepted")
            costs[name] = (time.perf_counter() - started) / count * 1e6

    await with_pump(orders_organism(), measure)
    worst_name = max(costs, key=lambda name: costs[name])
    worst = costs[worst_name] / valid_us
    return Result(
        "7. cost of rejecting bad input",
        ", ".join(f"{name} {us:.0f} us" for name, us in costs.items()),
        f"valid round trip {valid_us:.0f} us",
        worst,
        "each <= 3x a valid hop",
        worst <= 3,
        {"costs_us": costs, "valid_us": valid_us, "worst": worst_name},
    )
