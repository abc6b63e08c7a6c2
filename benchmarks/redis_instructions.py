"""Instructions ``redis-server`` runs per durable one-hop conversation: a figure that does not swing.

The CPU time Redis spends per conversation (measurement 9, ``benchmarks.durable_cpu``) moved by up to 60%
between back-to-back runs on the shared 2-core machines, more than most changes to the commit script are
worth. The instructions it executes for the same work, counted by valgrind's callgrind only while the
measured conversations run, move by about 1%, so one run of each side judges such a change. Instructions
are not time (cache misses, copies, the kernel's share are not in them): the targets stay in CPU time, and
this figure steers the work on what Redis runs::

    .venv/bin/python -m benchmarks.redis_instructions [conversations]

Needs valgrind (Debian package ``valgrind``), which ``make bench`` installs (measurement 9 prints this figure
too) and nothing else of the project needs. Under it
Redis runs about fifty times slower, so the engine's batches are larger than at full speed: compare figures
from this tool with each other, not with a count taken some other way.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from benchmarks.measure import envelope
from benchmarks.workload import sample_order

WARM_UP = 300


def instructions_in(dump: Path) -> int:
    """The instructions a callgrind dump counted (its ``summary:`` or ``totals:`` line)."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"{dump} holds no summary line: not a callgrind dump")


def _control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=120)


async def instructions_per_conversation(conversations: int) -> float:
    """Redis's instructions per one-hop conversation of the Order workload, 64 clients, after a warm-up."""
    from benchmarks.durable import CLIENTS, durable_engine, durable_loop  # it reports this figure too
    from tests.redis_server import RedisServer

    dumps = Path(tempfile.mkdtemp(prefix="xp-callgrind-"))
    launcher = ["valgrind", "--tool=callgrind", "--collect-atstart=yes", f"--callgrind-out-file={dumps}/out"]
    server = RedisServer(launcher=launcher)
    server.start(timeout=60)
    assert server.process is not None
    order = envelope(sample_order(), "orders")
    try:
        async with durable_engine(server.url) as engine:
            await durable_loop(engine, order, WARM_UP, CLIENTS)
            _control("--zero", server.process.pid)
            await durable_loop(engine, order, conversations, CLIENTS)
            _control("--dump", server.process.pid)
        return instructions_in(dumps / "out.1") / conversations  # the dump asked for; the exit's comes later
    finally:
        server.close()
        shutil.rmtree(dumps, ignore_errors=True)


def missing_tools() -> str | None:
    """Why nothing can be counted here, or None."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return "valgrind is not installed (Debian package valgrind)"
    return None


def main() -> int:
    missing = missing_tools()
    if missing is not None:
        print(f"{missing}: nothing measured", file=sys.stderr)
        return 2
    conversations = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    logging.getLogger("xml_pipeline").setLevel(logging.CRITICAL)
    figure = uvloop.run(instructions_per_conversation(conversations))
    print(f"redis-server instructions per one-hop conversation ({conversations:,} of them): {figure:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
