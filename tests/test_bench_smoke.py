"""The benchmark suite runs end to end (with tiny counts), so it cannot rot. No figure is judged here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_quick_benchmark_run_produces_every_measurement(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [entry["name"][:2] for entry in results] == ["1.", "2.", "3.", "4.", "5.", "6.", "7."]
    assert all(entry["baseline"] and entry["target"] for entry in results)
    assert "targets met" in (tmp_path / "results.txt").read_text()
