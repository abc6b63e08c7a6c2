"""The shared floor, ``../shared/bench/lxml_floor.py``, run as its authors run it.

The script measures at import time and prints one line, so it runs in a
process of its own (with this interpreter and its lxml) and its printed figure
is read back; its code is never copied here, so the two cannot drift apart.
The shared folder sits beside the project root in CI and in a clean clone; when
it is absent the benchmarks say so and go on without it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
SCRIPT = Path("bench") / "lxml_floor.py"
_FIGURE = re.compile(r"^(\d+) B envelope: ([\d,]+) hops/s", re.MULTILINE)


@dataclass(frozen=True)
class SharedFloor:
    script: Path

    def measure(self, hops: int) -> tuple[int, float]:
        """(envelope bytes, hops per second) as the script prints them after ``hops`` hops."""
        result = subprocess.run(
            [sys.executable, str(self.script), str(hops)], capture_output=True, text=True, timeout=600, check=False
        )
        found = _FIGURE.search(result.stdout)
        if result.returncode != 0 or found is None:
            output = (result.stdout + result.stderr)[-2000:]
            raise RuntimeError(f"{self.script} exited {result.returncode} without its figure: {output}")
        return int(found.group(1)), float(found.group(2).replace(",", ""))


def locate(shared: Path) -> SharedFloor | str:
    """The floor in the shared folder ``shared``, or why there is none."""
    script = shared / SCRIPT
    if not script.is_file():
        return f"not measured: {script} is absent (the shared folder sits beside the project root)"
    return SharedFloor(script)
