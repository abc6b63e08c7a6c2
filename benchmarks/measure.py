"""Seven of the eight measurements of `make bench` (the eighth: :mod:`benchmarks.observe_cost`).
Each returns a Result: a figure, its baselines
measured in the same run, every ratio as pairs measured back to back (median and
range, every pair kept), and the target it is held to, judged on the medians."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import workload
from benchmarks.floor import floor_rate
from benchmarks.paired import Paired, Spread, Step, interleaved
from benchmarks.shared_floor import SharedFloor
from benchmarks.workload import Greeting, Order, Receipt, Work, sample_order
from xml_pipeline.config.loader import load_organism
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message.envelope import serialize_envelope
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.primitives import BufferComplete, BufferStart

ROOT = Path(__file__).resolve().parent.parent
BENCH_LIMITS = PumpLimits(
    queue_size=8192, max_in_flight=1024, max_message_bytes=64 * 1024 * 1024, max_conversations=1_000_000
)


@dataclass
class Result:
    """A figure, its baselines measured in the same run, and the target it is held to.

    ``ratios`` holds every ratio of the measurement, each from pairs measured
    back to back; the first is the one the target speaks of, if any.
    """

    name: str
    figure: str
    baseline: str
    target: str
    met: bool
    ratios: dict[str, Paired] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Floor:
    """A floor's figure, and the pump's ratio to it on an envelope of the floor's shape."""

    source: str
    envelope_bytes: int
    hops_per_s: Spread
    pump_envelope_bytes: int
    pump_hops_per_s: Spread
    ratio: Spread

    @classmethod
    def of(cls, source: str, envelope_bytes: int, pump: Paired, pump_envelope_bytes: int) -> Floor:
        """From the pairs of pump (subject) and floor (baseline)."""
        return cls(source, envelope_bytes, pump.baseline_figure, pump_envelope_bytes, pump.subject_figure, pump.ratio)


def envelope(payload: Any, to: str) -> bytes:
    return serialize_envelope("console", to, str(uuid.uuid4()), codec_for(type(payload)).to_element(payload))


def orders_organism(*, cpu_bound: bool = False, workers: int = 1) -> Organism:
    listeners = [
        Listener("orders", [Order], workload.receipt, max_concurrency=1024),
        Listener("relay", [Order, Receipt], workload.relay, peers=["orders"], max_concurrency=1024),
        Listener("greeter", [Greeting], workload.greet, max_concurrency=1024),
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


@contextlib.asynccontextmanager
async def running(organism: Organism, backend: SharedBackend | None = None) -> AsyncIterator[Pump]:
    """A started pump, stopped on the way out. Several may run at once, so that the
    two sides of a pair are both warm and can be measured one right after the other."""
    pump = Pump(organism, backend=backend)
    await pump.start()
    try:
        yield pump
    finally:
        await pump.stop(drain_timeout=30)


# ---------------------------------------------------------------- 1. hop throughput

CLIENTS = 128


async def hop_throughput(hops: int, repeats: int, shared: SharedFloor | str) -> tuple[Result, Floor, Floor | None]:
    """The pump against both floors, pair by pair: the project's floor and the pump
    on the 1 KB Order envelope; the shared floor on its own 233 B envelope and the
    pump on a Greeting envelope of the same shape (our clients write a prefix, so
    it is a few bytes longer)."""
    order = envelope(sample_order(), "orders")
    greeting = envelope(Greeting("world", 3), "greeter")
    shared_bytes: list[int] = []
    async with running(orders_organism()) as pump:
        for raw in (order, greeting):
            await closed_loop(pump, raw, min(hops, 2000), CLIENTS)  # warm-up

        async def own_floor() -> float:
            return floor_rate(order, hops)

        steps: dict[str, Step] = {
            "own floor": own_floor,
            "pump on Order": lambda: closed_loop(pump, order, hops, CLIENTS),
        }
        if isinstance(shared, SharedFloor):
            script = shared

            async def shared_floor() -> float:
                size, rate = script.measure(hops)
                shared_bytes.append(size)
                return rate

            steps["shared floor"] = shared_floor
            steps["pump on Greeting"] = lambda: closed_loop(pump, greeting, hops, CLIENTS)
        figures = await interleaved(repeats, steps)

    to_own = Paired.of(f"pump on the {len(order)} B Order", figures["pump on Order"], "own floor", figures["own floor"])
    own = Floor.of("benchmarks/floor.py", len(order), to_own, len(order))
    ratios = {"own floor": to_own}
    baseline = f"own floor (benchmarks/floor.py) {own.hops_per_s.text(',.0f')} hops/s on the {len(order)} B Order"
    figure = f"{own.pump_hops_per_s.text(',.0f')} hops/s on the {len(order)} B Order"
    reference = None
    if isinstance(shared, SharedFloor):
        to_shared = Paired.of(
            f"pump on the {len(greeting)} B Greeting",
            figures["pump on Greeting"],
            "shared floor",
            figures["shared floor"],
        )
        ratios["shared floor"] = to_shared
        reference = Floor.of(str(shared.script), max(shared_bytes), to_shared, len(greeting))
        baseline += (
            f"; shared floor {reference.hops_per_s.text(',.0f')} hops/s on its {reference.envelope_bytes} B envelope"
        )
        figure += f"; {reference.pump_hops_per_s.text(',.0f')} hops/s on the {len(greeting)} B Greeting"
    else:
        baseline += f"; shared floor {shared}"
    return (
        Result(
            "1. hop throughput (in-process, memory, full validation)",
            f"{figure} (median [range] of {repeats})",
            baseline,
            "median pump / own floor >= 0.5",
            to_own.ratio.median >= 0.5,
            ratios,
        ),
        own,
        reference,
    )


# ---------------------------------------------------------------- 2. latency


async def latency(max_rate: float, floor_hop_rate: float, seconds: float, windows: int) -> Result:
    """``windows`` windows of ``seconds`` each, every one reported: the median p99
    is held to the target and the worst p99 stands beside it, since the tail a
    busy neighbour causes is also the tail a user would see on such a machine."""
    rate = max_rate / 2
    measured = [_tail(await _latency_window(rate, seconds)) for _ in range(windows)]
    p99 = Spread.of([window["p99_us"] for window in measured])
    p50 = Spread.of([window["p50_us"] for window in measured])
    p999 = Spread.of([window["p999_us"] for window in measured])
    return Result(
        "2. round-trip latency at 50% of the median max rate",
        f"p99 median {p99.median:,.0f} us, worst {p99.max:,.0f} us over {windows} windows; "
        f"p50 median {p50.median:,.0f} us; p99.9 median {p999.median:,.0f} us, worst {p999.max:,.0f} us",
        f"offered {rate:,.0f} msg/s (half of {max_rate:,.0f}); a floor hop takes {1e6 / floor_hop_rate:,.0f} us",
        "median p99 <= 1000 us",
        p99.median <= 1000,
        details={"offered_rate": rate, "p99_us": p99, "p50_us": p50, "p999_us": p999, "windows": measured},
    )


def _tail(sorted_samples: list[float]) -> dict[str, float]:
    def percentile(fraction: float) -> float:
        return sorted_samples[min(len(sorted_samples) - 1, int(fraction * len(sorted_samples)))] * 1e6

    return {
        "samples": len(sorted_samples),
        "p50_us": percentile(0.5),
        "p99_us": percentile(0.99),
        "p999_us": percentile(0.999),
    }


async def _latency_window(rate: float, seconds: float) -> list[float]:
    raw = envelope(sample_order(), "orders")
    samples: list[float] = []
    async with running(orders_organism()) as pump:

        async def one() -> None:
            sent = time.perf_counter()
            submission = await pump.inject(raw)
            await submission.next_reply(60)
            samples.append(time.perf_counter() - sent)

        await closed_loop(pump, raw, 1000, 32)  # warm-up
        # The schedule keeps its own clock: uvloop's (loop.time()) moves in whole milliseconds, so it sent the
        # messages of each millisecond in one burst, and a burst's last message waited for the ones before it.
        started = time.perf_counter()
        sent = 0
        async with asyncio.TaskGroup() as group:
            while (elapsed := time.perf_counter() - started) < seconds:
                due = int(elapsed * rate) - sent
                for _ in range(due):
                    group.create_task(one())
                sent += max(due, 0)
                await asyncio.sleep(0.0005)
    return sorted(samples)


# ---------------------------------------------------------------- 3. redis


async def redis_throughput(count: int, repeats: int, instructions_of: int = 0) -> Result:
    """The Redis pump and the memory pump, both running, measured pair by pair; with ``instructions_of``, also
    the instructions Redis runs per round trip over that many (:mod:`benchmarks.redis_instructions`)."""
    from benchmarks import redis_instructions  # it measures with this module's pump and loop
    from tests.redis_server import RedisServer

    server = RedisServer()
    server.start()
    backend = RedisBackend(server.url, prefix="bench:")
    raw = envelope(sample_order(), "orders")
    try:
        async with running(orders_organism()) as memory, running(orders_organism(), backend) as redis:
            for pump in (memory, redis):
                await closed_loop(pump, raw, min(count, 500), 64)  # warm-up
            figures = await interleaved(
                repeats,
                {
                    "memory": lambda: closed_loop(memory, raw, count, 64),
                    "redis": lambda: closed_loop(redis, raw, count, 64),
                },
            )
        leftover = len(backend.keys())
    finally:
        backend.close()
        server.close()
    ratio = Paired.of("Redis pump", figures["redis"], "memory pump", figures["memory"])
    instructions, note = await redis_instructions.counted(
        redis_instructions.instructions_per_round_trip, instructions_of
    )
    return Result(
        "3. hop throughput on a local redis-server (registry + history in Redis)",
        f"{ratio.subject_figure.text(',.0f')} hops/s (median [range] of {repeats}); {note} per round trip",
        f"same pump on memory {ratio.baseline_figure.text(',.0f')} hops/s",
        "median >= 10,000 hops/s",
        ratio.subject_figure.median >= 10_000,
        {"memory": ratio},
        {"keys_left": leftover, "redis_instructions_per_round_trip": instructions},
    )


# ---------------------------------------------------------------- 4. process pool


def calibrate_rounds(target_seconds: float = 0.005) -> int:
    rounds = 10_000
    started = time.perf_counter()
    workload.burn(rounds)
    return max(1, int(rounds * target_seconds / (time.perf_counter() - started)))


async def pool_scaling(count: int, calls: int, repeats: int) -> Result:
    """The pool with one worker and with two, a bare ProcessPoolExecutor with one and
    with two, and one offloaded call beside an in-process call and a bare empty
    executor call. All run at once and each repeat measures them one after the
    other, so the pool is held to what the machine allowed at that moment."""
    rounds = calibrate_rounds()
    heavy = envelope(Work(rounds), "cruncher")
    trivial = envelope(Work(0), "cruncher")
    spawn = multiprocessing.get_context("spawn")
    async with (
        running(orders_organism(cpu_bound=True, workers=1)) as one,
        running(orders_organism(cpu_bound=True, workers=2)) as two,
        running(orders_organism()) as in_process,
    ):
        with ProcessPoolExecutor(1, mp_context=spawn) as bare_one, ProcessPoolExecutor(2, mp_context=spawn) as bare_two:
            for pump, workers in ((one, 1), (two, 2)):
                await closed_loop(pump, heavy, 4 * workers, 4 * workers)  # warm every worker
            for pump in (one, in_process):
                await closed_loop(pump, trivial, 200, 1)
            for executor, workers in ((bare_one, 1), (bare_two, 2)):
                await burns(executor, 1, 2 * workers)
            figures = await interleaved(
                repeats,
                {
                    "pool, 1 worker": lambda: closed_loop(one, heavy, count, 8),
                    "pool, 2 workers": lambda: closed_loop(two, heavy, count, 8),
                    "bare, 1 worker": lambda: burns(bare_one, rounds, count),
                    "bare, 2 workers": lambda: burns(bare_two, rounds, count),
                    "offloaded call": lambda: call_us(one, trivial, calls),
                    "in-process call": lambda: call_us(in_process, trivial, calls),
                    "bare empty call": lambda: empty_call_us(bare_one, calls),
                },
            )
    scaling = Paired.of("pool, 2 workers", figures["pool, 2 workers"], "pool, 1 worker", figures["pool, 1 worker"])
    bare = Paired.of("bare, 2 workers", figures["bare, 2 workers"], "bare, 1 worker", figures["bare, 1 worker"])
    versus_bare = Paired.of(
        "pool scaling", [pair.ratio for pair in scaling.pairs], "bare scaling", [pair.ratio for pair in bare.pairs]
    )
    overheads = [
        offloaded - local
        for offloaded, local in zip(figures["offloaded call"], figures["in-process call"], strict=True)
    ]
    overhead = Paired.of("pool overhead per call", overheads, "bare empty call", figures["bare empty call"])
    return Result(
        "4. process pool scaling (5 ms pure-Python handler)",
        f"2 workers {scaling.ratio.text('.2f')} x one; overhead {overhead.subject_figure.text(',.0f')} us per call "
        f"(median [range] of {repeats})",
        f"1 worker {scaling.baseline_figure.text(',.1f')} msg/s; "
        f"in-process call {Spread.of(figures['in-process call']).text(',.0f')} us; bare ProcessPoolExecutor: "
        f"2 workers {bare.ratio.text('.2f')} x one, empty call {overhead.baseline_figure.text(',.0f')} us",
        "median: 2 workers >= 1.7x one; overhead <= 300 us",
        scaling.ratio.median >= 1.7 and overhead.subject_figure.median <= 300,
        {"scaling": scaling, "scaling vs bare": versus_bare, "bare scaling": bare, "overhead vs bare call": overhead},
        {"rounds": rounds, "calls": calls, "offloaded_call_us": figures["offloaded call"]},
    )


async def call_us(pump: Pump, raw: bytes, calls: int) -> float:
    """Microseconds per round trip, one message at a time."""
    return 1e6 / await closed_loop(pump, raw, calls, 1)


async def burns(executor: ProcessPoolExecutor, rounds: int, count: int) -> float:
    """Burns per second through a bare executor, all submitted at once."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    await asyncio.gather(*(loop.run_in_executor(executor, workload.burn, rounds) for _ in range(count)))
    return count / (time.perf_counter() - started)


async def empty_call_us(executor: ProcessPoolExecutor, calls: int) -> float:
    """Microseconds per bare executor call that does nothing: what the transport costs by itself."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    for _ in range(calls):
        await loop.run_in_executor(executor, workload.burn, 0)
    return (time.perf_counter() - started) / calls * 1e6


# ---------------------------------------------------------------- 5. buffer


async def buffer_throughput(items: int, hops: int, repeats: int) -> Result:
    """In-process, the buffer's items per second paired with the same pump's round
    trips (each item is a conversation of its own); cpu_bound afterwards on a pump
    of its own, since the orchestration registries belong to the process and so to
    one running pump at a time."""
    work = [f"<Work><rounds>{i % 3}</rounds></Work>" for i in range(items)]
    raw = envelope(BufferStart(target="cruncher", items=work, max_in_flight=256, timeout_seconds=600), "system.buffer")
    order = envelope(sample_order(), "orders")

    async def buffer_rate(pump: Pump) -> float:
        began = time.perf_counter()
        reply = await (await pump.inject(raw)).next_reply(600)
        elapsed = time.perf_counter() - began
        if not isinstance(reply.payload, BufferComplete) or reply.payload.successful != items:
            raise RuntimeError(f"buffer benchmark failed: {reply.payload!r:.300}")
        return items / elapsed

    async with running(orders_organism(workers=2)) as pump:
        await closed_loop(pump, order, min(hops, 2000), CLIENTS)  # warm-up
        figures = await interleaved(
            repeats, {"pump": lambda: closed_loop(pump, order, hops, CLIENTS), "buffer": lambda: buffer_rate(pump)}
        )
    async with running(orders_organism(cpu_bound=True, workers=2)) as pump:
        cpu_bound = Spread.of([await buffer_rate(pump) for _ in range(repeats)])
    in_process = Paired.of("buffer items", figures["buffer"], "pump round trips", figures["pump"])
    return Result(
        f"5. buffer fan-out/fan-in of {items:,} items",
        f"in-process {in_process.subject_figure.text(',.0f')} items/s; "
        f"cpu_bound (2 workers) {cpu_bound.text(',.0f')} items/s (median [range] of {repeats})",
        f"pump round trips {in_process.baseline_figure.text(',.0f')}/s",
        "median: in-process >= 15,000 items/s; cpu_bound >= 5,000 items/s",
        in_process.subject_figure.median >= 15_000 and cpu_bound.median >= 5_000,
        {"in-process": in_process},
        {"cpu_bound_items_per_s": cpu_bound},
    )


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def memory_growth(messages: int) -> Result:
    organism = load_organism(ROOT / "organism.yaml")
    organism.limits = BENCH_LIMITS
    from workers.hello import Greeting as HelloGreeting

    raw = envelope(HelloGreeting("memory", 2), "greeter")
    hops_per_conversation = 6
    conversations = messages // hops_per_conversation
    async with running(organism) as pump:
        await closed_loop(pump, raw, max(conversations // 10, 1000), CLIENTS)  # warm-up
        gc.collect()
        before = resident_mb()
        await closed_loop(pump, raw, conversations, CLIENTS)
        gc.collect()
        after = resident_mb()
        threads, buffers = len(pump.registry), len(pump.buffer.list_threads())
    growth = after - before
    return Result(
        f"6. memory over {conversations * hops_per_conversation:,} messages (example organism)",
        f"RSS grew {growth:+.1f} MB; live threads {threads}, buffers {buffers}",
        f"RSS after warm-up {before:.1f} MB",
        "growth <= 20 MB; threads back to 0",
        growth <= 20 and threads == 0 and buffers == 0,
        details={"rss_before_mb": before, "rss_after_mb": after, "threads": threads},
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


async def bad_input_cost(count: int, repeats: int) -> Result:
    """Each kind of bad input beside a valid message sent the same way, one at a
    time, in the same round: each kind's cost is paired with the valid round trip."""
    valid = envelope(sample_order(), "orders")
    bad = dict(BAD_INPUTS)
    bad["schema violation"] = valid.replace(b"<priority>3</priority>", b"<priority>high</priority>")
    bad["unknown target"] = valid.replace(b"<xp:to>orders</xp:to>", b"<xp:to>nobody</xp:to>")
    async with running(orders_organism()) as pump:
        steps: dict[str, Step] = {"valid": functools.partial(one_at_a_time_us, pump, valid, count, valid=True)}
        steps |= {name: functools.partial(one_at_a_time_us, pump, raw, count, valid=False) for name, raw in bad.items()}
        for step in steps.values():  # warm-up
            await step()
        figures = await interleaved(repeats, steps)
    ratios = {name: Paired.of(name, figures[name], "valid round trip", figures["valid"]) for name in bad}
    ratios = dict(sorted(ratios.items(), key=lambda item: -item[1].ratio.median))
    return Result(
        "7. cost of rejecting bad input",
        ", ".join(f"{name} {paired.subject_figure.median:.0f} us" for name, paired in ratios.items())
        + f" (medians of {repeats})",
        f"valid round trip, one at a time, {Spread.of(figures['valid']).text('.0f')} us",
        "median: each <= 3x a valid round trip",
        all(paired.ratio.median <= 3 for paired in ratios.values()),
        ratios,
    )


async def one_at_a_time_us(pump: Pump, raw: bytes, count: int, *, valid: bool) -> float:
    """Microseconds per round trip, one message at a time; a reply that is not what
    ``valid`` expects ends the benchmark, since it would not be measuring rejection."""
    started = time.perf_counter()
    for _ in range(count):
        reply = await (await pump.inject(raw)).next_reply(10)
        if reply.is_error == valid:
            raise RuntimeError(f"expected {'a reply' if valid else 'an error'}, got {reply.payload!r:.300}")
    return (time.perf_counter() - started) / count * 1e6
