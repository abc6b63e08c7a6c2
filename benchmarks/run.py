"""`make bench`: run every measurement, print a table, write the results.

python -m benchmarks.run            # the full run (a few minutes)
python -m benchmarks.run --quick    # seconds: smaller counts, same code paths
python -m benchmarks.run --shared DIR   # the shared floor from DIR/bench/lxml_floor.py
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import uvloop

from benchmarks import durable, measure
from benchmarks.measure import Floor, Result
from benchmarks.observe_cost import observation_cost
from benchmarks.shared_floor import DEFAULT_SHARED, SCRIPT, SharedFloor, locate
from xml_pipeline.collector import settle_for_serving

FULL = {
    "hops": 20_000,
    "latency_seconds": 5.0,
    "redis": 10_000,
    "pool": 200,
    "calls": 1000,
    "buffer": 10_000,
    "memory": 1_000_000,
    "bad": 2_000,
    "durable": 4_000,
    "instructions": 1_000,
    "repeats": 5,
}
QUICK = {
    "hops": 1_000,
    "latency_seconds": 0.5,
    "redis": 500,
    "pool": 16,
    "calls": 200,
    "buffer": 500,
    "memory": 12_000,
    "bad": 100,
    "durable": 200,
    "instructions": 0,
    "repeats": 2,
}


REFERENCE_FLOOR_HOPS_PER_S = 15_000
"""The own floor on the development machine of 2026-12-01, where the absolute targets (hops/s, items/s, us)
were met or missed: 9,038 hops/s at 0.60 x the floor, 8,977 at 0.60 and 9,251 at 0.62 in that day's runs."""


@dataclass
class Report:
    own_floor: Floor
    shared_floor: Floor | None
    shared_floor_note: str
    results: list[Result]


async def run_all(sizes: dict[str, float], shared: SharedFloor | str) -> Report:
    repeats = int(sizes["repeats"])
    hops = int(sizes["hops"])
    first, own, reference = await measure.hop_throughput(hops, repeats, shared)
    results = [first]
    results.append(
        await measure.latency(own.pump_hops_per_s.median, own.hops_per_s.median, sizes["latency_seconds"], repeats)
    )
    results.append(
        await measure.redis_throughput(int(sizes["redis"]), repeats, instructions_of=int(sizes["instructions"]))
    )
    results.append(await measure.pool_scaling(int(sizes["pool"]), int(sizes["calls"]), repeats))
    results.append(await measure.buffer_throughput(int(sizes["buffer"]), hops, repeats))
    results.append(await measure.memory_growth(int(sizes["memory"])))
    results.append(await measure.bad_input_cost(int(sizes["bad"]), repeats))
    results.append(await observation_cost(hops, repeats))
    results.append(
        await durable.durable_throughput(
            int(sizes["durable"]), repeats, daemon_count=2, instructions_of=int(sizes["instructions"])
        )
    )
    note = shared if isinstance(shared, str) else f"measured by running {shared.script} in a process of its own"
    return Report(own, reference, note, results)


def render(report: Report, quick: bool) -> str:
    own = report.own_floor
    lines = [
        f"xml-pipeline benchmarks ({'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M:%S')})",
        f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "figures: median [min to max] over the repeats; every ratio over pairs measured back to back",
        "",
        "floors, hops/s on one core, and the pump's ratio to each on an envelope of the floor's shape",
        f"  own     {own.source}, {own.envelope_bytes} B envelope: {own.hops_per_s.text(',.0f')}; "
        f"pump {own.ratio.text('.2f')}",
    ]
    if (shared := report.shared_floor) is not None:
        lines.append(
            f"  shared  {shared.source}, {shared.envelope_bytes} B envelope: {shared.hops_per_s.text(',.0f')}; "
            f"pump ({shared.pump_envelope_bytes} B) {shared.ratio.text('.2f')}"
        )
    else:
        lines.append(f"  shared  {report.shared_floor_note}")
    speed = own.hops_per_s.median / REFERENCE_FLOOR_HOPS_PER_S
    lines.append(
        f"  speed   this machine's own floor is {speed:.2f} x the development machine's of 2026-12-01 "
        f"({REFERENCE_FLOOR_HOPS_PER_S:,} hops/s), where the absolute targets below were set: read absolute "
        "figures with that factor (ratios need none)"
    )
    for result in report.results:
        lines += ["", result.name, f"  figure   {result.figure}", f"  baseline {result.baseline}"]
        lines += [f"  ratio    {paired.text()}" for paired in result.ratios.values()]
        lines.append(f"  target   {result.target}   {'MET' if result.met else 'NOT MET'}")
    met = sum(result.met for result in report.results)
    lines += ["", f"{met} of {len(report.results)} targets met"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in seconds")
    parser.add_argument("--out", default="bench-results", help="folder for results.json and results.txt")
    parser.add_argument(
        "--shared",
        type=Path,
        default=DEFAULT_SHARED,
        help=f"the shared folder holding {SCRIPT} (default: {DEFAULT_SHARED})",
    )
    arguments = parser.parse_args()
    sizes = QUICK if arguments.quick else FULL
    logging.getLogger("xml_pipeline").setLevel(logging.CRITICAL)  # rejections are the point of bench 7, not news
    settle_for_serving()  # measure what a daemon runs: its collector settings too
    report = uvloop.run(run_all(sizes, locate(arguments.shared)))
    text = render(report, arguments.quick)
    print(text)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.txt").write_text(text + "\n")
    document = {
        "run": {
            "kind": "quick" if arguments.quick else "full",
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": platform.machine(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "sizes": sizes,
        },
        **asdict(report),
    }
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
