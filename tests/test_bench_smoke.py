"""The benchmark suite runs end to end (with tiny counts), so it cannot rot, and its
method is the one docs/benchmarks.md describes: every ratio from pairs measured back
to back, reported as a median with its range, every pair kept; latency over every
window; both floors. No figure is judged here."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import redis_instructions
from benchmarks.cpu_time import cpu_microseconds
from benchmarks.durable_cpu import durable_cpu_microseconds
from benchmarks.redis_instructions import instructions_in
from benchmarks.shared_floor import DEFAULT_SHARED, SCRIPT
from tests.conftest import ROOT


def quick_run(out: Path, *options: str) -> tuple[dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.txt").read_text()


def assert_spread(spread: dict[str, float]) -> None:
    assert spread["min"] <= spread["median"] <= spread["max"]


def test_quick_benchmark_run_reports_paired_medians_with_ranges_and_both_floors(tmp_path: Path) -> None:
    document, text = quick_run(tmp_path)
    results = document["results"]
    repeats = document["run"]["sizes"]["repeats"]
    assert repeats >= 2, "the quick run must take turns at least once"
    assert [entry["name"][:2] for entry in results] == ["1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9."]
    assert all(entry["baseline"] and entry["target"] for entry in results)
    assert "targets met" in text

    ratios = {entry["name"][:2]: entry["ratios"] for entry in results}
    assert {"own floor"} <= set(ratios["1."])
    assert set(ratios["3."]) == {"memory"}
    assert {"scaling", "scaling vs bare", "overhead vs bare call"} <= set(ratios["4."])
    assert set(ratios["5."]) == {"in-process"}
    assert len(ratios["7."]) == 6
    assert set(ratios["8."]) == {"tracing on", "OpenTelemetry on"}
    assert set(ratios["9."]) == {"memory", "at-most-once", "daemons"}
    assert results[8]["details"]["redis_cpu_us_per_hop"] > 0
    assert results[8]["details"]["redis_cpu_us_per_reference_set"] > 0  # the per-hop figure in units of this machine
    assert "pipelined 1 KB SETs" in results[8]["figure"]
    assert "x the development machine's" in text  # the machine's speed against where the absolute targets were set
    for paired in (paired for entry in results for paired in entry["ratios"].values()):
        assert len(paired["pairs"]) == repeats
        for pair in paired["pairs"]:
            assert pair["ratio"] == pytest.approx(pair["subject"] / pair["baseline"])
        assert_spread(paired["ratio"])
        assert paired["ratio"]["median"] == pytest.approx(statistics.median(pair["ratio"] for pair in paired["pairs"]))
    assert f"over {repeats} pairs" in text

    latency = results[1]["details"]
    assert len(latency["windows"]) == repeats
    p99s = [window["p99_us"] for window in latency["windows"]]
    assert latency["p99_us"]["max"] == max(p99s)
    assert_spread(latency["p99_us"])
    assert "p99 median" in results[1]["figure"]
    assert "worst" in results[1]["figure"]

    own = document["own_floor"]
    assert own["envelope_bytes"] > 1000
    assert own["ratio"] == ratios["1."]["own floor"]["ratio"]
    assert f"  own     benchmarks/floor.py, {own['envelope_bytes']} B envelope: " in text
    if (DEFAULT_SHARED / SCRIPT).is_file():
        shared = document["shared_floor"]
        assert shared["envelope_bytes"] < 300
        assert shared["ratio"] == ratios["1."]["shared floor"]["ratio"]
        assert_spread(shared["hops_per_s"])
        assert f"  shared  {shared['source']}, {shared['envelope_bytes']} B envelope: " in text
    else:
        assert document["shared_floor"] is None


def test_quick_benchmark_run_without_the_shared_folder_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "no-shared-here"
    document, text = quick_run(tmp_path, "--shared", str(missing))
    assert document["shared_floor"] is None
    assert str(missing / SCRIPT) in document["shared_floor_note"]
    assert "absent" in document["shared_floor_note"]
    assert set(document["results"][0]["ratios"]) == {"own floor"}
    assert document["own_floor"]["ratio"]["median"] > 0
    assert f"shared  not measured: {missing / SCRIPT} is absent" in text


async def test_cpu_time_per_unit_runs_end_to_end() -> None:
    spent = await cpu_microseconds(1, hops=50, items=50)
    assert sorted(spent) == ["buffer item", "floor hop", "pump round trip"]
    assert all(value > 0 for value in spent.values())


async def test_durable_cpu_per_round_trip_runs_end_to_end() -> None:
    spent = await durable_cpu_microseconds(1, conversations=50)
    assert sorted(spent) == ["engine", "redis"]
    assert all(value > 0 for value in spent.values())


def test_the_instruction_count_is_read_from_the_callgrind_dump_asked_for(tmp_path: Path) -> None:
    """benchmarks.redis_instructions reads the count of the dump it asked for, and refuses a file that is none
    (valgrind itself is not installed by `make test`, so the measurement is run by hand)."""
    dump = tmp_path / "out.1"
    dump.write_text("# callgrind format\nversion: 1\nevents: Ir\nfl=(1) x.c\nfn=(1) f\n3 12\nsummary: 270899123\n")
    assert instructions_in(dump) == 270_899_123
    other = tmp_path / "other"
    other.write_text("not a dump\n")
    with pytest.raises(ValueError, match="no summary"):
        instructions_in(other)


async def test_the_instruction_count_says_so_when_valgrind_is_missing_or_the_run_is_quick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def never(units: int) -> float:
        raise AssertionError("nothing is to be measured")

    assert await redis_instructions.counted(never, 0) == (None, "instructions not counted (quick run)")
    monkeypatch.setattr(redis_instructions.shutil, "which", lambda name: None)
    assert redis_instructions.main() == 2
    figure, note = await redis_instructions.counted(never, 1000)
    assert figure is None
    assert "valgrind is not installed" in note
