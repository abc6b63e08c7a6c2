"""Instructions ``redis-server`` runs per durable one-hop conversation (and per at-most-once round trip):
figures that do not swing.

The CPU time Redis spends per conversation (measurement 9, ``benchmarks.durable_cpu``) moved by up to 60%
between back-to-back runs on the shared 2-core machines, more than most changes to the commit script are
worth. The instructions it executes for the same work, counted by valgrind's callgrind only while the
measured conversations run, move by about 1%, so one run of each side judges such a change. Instructions
are not time (cache misses, copies, the kernel's share are not in them): the targets stay in CPU time, and
this figure steers the work on what Redis runs::

    .venv/bin/python -m benchmarks.redis_instructions [conversations]

Needs valgrind (Debian package ``valgrind``), which ``make bench`` installs (measurements 3 and 9 print these
figures too) and nothing else of the project needs. Under it Redis runs about fifty times slower, so the
batches are larger than at full speed: compare figures from this tool with each other, not with a count taken
some other way.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
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


class CountedRedis:
    """A ``redis-server`` under callgrind: :meth:`zero` before the work to count, :meth:`count` after it."""

    def __init__(self) -> None:
        from tests.redis_server import RedisServer

        self._dumps = Path(tempfile.mkdtemp(prefix="xp-callgrind-"))
        launcher = ["valgrind", "--tool=callgrind", "--collect-atstart=yes", f"--callgrind-out-file={self._dumps}/out"]
        self._server = RedisServer(launcher=launcher)
        self._taken = 0

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> CountedRedis:
        self._server.start(timeout=60)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.close()
        shutil.rmtree(self._dumps, ignore_errors=True)

    def zero(self) -> None:
        self._control("--zero")

    def count(self) -> int:
        """The instructions since :meth:`zero`: a dump of its own (callgrind numbers them from 1)."""
        self._control("--dump")
        self._taken += 1
        return instructions_in(self._dumps / f"out.{self._taken}")

    def _control(self, option: str) -> None:
        assert self._server.process is not None, "the server is not running"
        pid = str(self._server.process.pid)
        subprocess.run(["callgrind_control", option, pid], check=True, capture_output=True, timeout=120)


async def instructions_per_conversation(conversations: int) -> float:
    """Redis's instructions per durable one-hop conversation of the Order workload, 64 clients, after a warm-up."""
    from benchmarks.durable import CLIENTS, durable_engine, durable_loop  # it reports this figure too

    order = envelope(sample_order(), "orders")
    with CountedRedis() as redis:
        async with durable_engine(redis.url) as engine:
            await durable_loop(engine, order, WARM_UP, CLIENTS)
            redis.zero()
            await durable_loop(engine, order, conversations, CLIENTS)
            return redis.count() / conversations


async def instructions_per_round_trip(round_trips: int) -> float:
    """Redis's instructions per round trip of the at-most-once Redis pump (measurement 3's), after a warm-up.

    A round trip's cleanup is written after its reply: the count starts and ends at the same point of a loop
    (its last replies in), so the warm-up's last cleanups, counted, stand for the measured loop's, not.
    """
    from benchmarks.measure import closed_loop, orders_organism, running
    from xml_pipeline.memory.redis_backend import RedisBackend

    order = envelope(sample_order(), "orders")
    with CountedRedis() as redis:
        backend = RedisBackend(redis.url, prefix="bench:", socket_timeout=60)
        try:
            async with running(orders_organism(), backend) as pump:
                await closed_loop(pump, order, WARM_UP, 64)
                redis.zero()
                await closed_loop(pump, order, round_trips, 64)
                return redis.count() / round_trips
        finally:
            backend.close()


async def counted(measure: Callable[[int], Awaitable[float]], units: int) -> tuple[float | None, str]:
    """``measure(units)``'s figure and how a benchmark's figure line says it, or None and why there is none."""
    if not units:
        return None, "instructions not counted (quick run)"
    missing = missing_tools()
    if missing is not None:
        return None, f"instructions not counted ({missing})"
    figure = await measure(units)
    return figure, f"{figure:,.0f} instructions of redis-server (callgrind)"


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
    print(f"redis-server instructions per durable one-hop conversation ({conversations:,} of them): {figure:,.0f}")
    figure = uvloop.run(instructions_per_round_trip(conversations))
    print(f"redis-server instructions per at-most-once round trip ({conversations:,} of them): {figure:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
