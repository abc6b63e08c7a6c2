"""`make bench`: run every measurement, print a table, write the results.

python -m benchmarks.run            # the full run (a few minutes)
python -m benchmarks.run --quick    # seconds: smaller counts, same code paths
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import uvloop

from benchmarks import measure
from benchmarks.measure import Result

SHARED_FLOOR = measure.ROOT.parent / "shared" / "bench" / "lxml_floor.py"

FULL = {
    "hops": 20_000,
    "latency_seconds": 5.0,
    "redis": 10_000,
    "pool": 200,
    "buffer": 10_000,
    "memory": 1_000_000,
    "bad": 2_000,
    "repeats": 3,
}
QUICK = {
    "hops": 1_000,
    "latency_seconds": 0.5,
    "redis": 500,
    "pool": 16,
    "buffer": 500,
    "memory": 12_000,
    "bad": 100,
    "repeats": 1,
}


async def run_all(sizes: dict[str, float]) -> list[Result]:
    repeats = int(sizes["repeats"])
    results = [await measure.hop_throughput(int(sizes["hops"]), repeats)]
    hop_rate = results[0].details["pump_hops_per_s"]
    floor_rate = results[0].details["floor_hops_per_s"]
    results.append(await measure.latency(hop_rate, floor_rate, sizes["latency_seconds"], repeats))
    results.append(await measure.redis_throughput(int(sizes["redis"]), hop_rate, repeats))
    results.append(await measure.pool_scaling(int(sizes["pool"]), repeats))
    results.append(await measure.buffer_throughput(int(sizes["buffer"]), hop_rate, repeats))
    results.append(await measure.memory_growth(int(sizes["memory"])))
    results.append(await measure.bad_input_cost(int(sizes["bad"]), hop_rate))
    return results


def shared_floor() -> str | None:
    """The reference floor script's own figure, when ../shared is beside the project."""
    if not SHARED_FLOOR.is_file():
        return None
    result = subprocess.run(
        [sys.executable, str(SHARED_FLOOR), "20000"], capture_output=True, text=True, timeout=300, check=False
    )
    return result.stdout.strip() or result.stderr.strip()


def render(results: list[Result], reference: str | None, quick: bool) -> str:
    lines = [
        f"xml-pipeline benchmarks ({'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M:%S')})",
        f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
    ]
    if reference:
        lines.append(f"reference floor (../shared/bench/lxml_floor.py): {reference}")
    for result in results:
        ratio = f"{result.ratio:.2f}" if result.ratio is not None else "-"
        lines += [
            "",
            result.name,
            f"  figure   {result.figure}",
            f"  baseline {result.baseline}",
            f"  ratio    {ratio}   target: {result.target}   {'MET' if result.met else 'NOT MET'}",
        ]
    met = sum(result.met for result in results)
    lines += ["", f"{met} of {len(results)} targets met"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run in seconds")
    parser.add_argument("--out", default="bench-results", help="folder for results.json and results.txt")
    arguments = parser.parse_args()
    sizes = QUICK if arguments.quick else FULL
    logging.getLogger("xml_pipeline").setLevel(logging.CRITICAL)  # rejections are the point of bench 7, not news
    reference = None if arguments.quick else shared_floor()
    results = uvloop.run(run_all(sizes))
    report = render(results, reference, arguments.quick)
    print(report)
    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.txt").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps([asdict(result) for result in results], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
