"""One ProcessPoolExecutor of the pool, from its start until it breaks, and who broke it.

When a worker dies, the executor fails every call it holds and stops its other
workers with SIGTERM. Once all of them have exited, their exit codes tell the
dead worker from the ones the executor stopped: a worker that exited any other
way than by that SIGTERM (killed, out of memory, a crash in C code, an exit
from the handler) died on its own, and the calls it had started are the ones
that crashed. Workers the pool killed itself (a stuck call) are not counted
as having died on their own. If no worker stands out (one ended by a SIGTERM
from elsewhere), every call that had started is held to have crashed, so that
a call which kills its worker that way cannot be run again forever.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from xml_pipeline.process_pool.started import StartMarks
from xml_pipeline.process_pool.worker import Task

EXIT_WAIT = 10.0
"""Seconds to wait for a broken executor's workers to exit before killing the rest."""

STOPPED_BY_EXECUTOR = -signal.SIGTERM


@dataclass(frozen=True, slots=True)
class HandOver:
    """A call as handed to an executor: its slot in the pool's line and the number of this hand-over."""

    slot: int
    number: int
    task: Task


class Generation:
    def __init__(self, executor: ProcessPoolExecutor) -> None:
        self.executor = executor
        self.calls: dict[int, HandOver] = {}
        """The calls handed to this executor and not yet answered, by slot."""
        self._processes: dict[int, BaseProcess] = {}
        self._manager: threading.Thread | None = None
        self._killed_by_pool: set[int] = set()
        self._crashed: frozenset[int] | None = None
        self._judging = asyncio.Lock()

    def processes(self) -> dict[int, BaseProcess]:
        return dict(self.executor._processes or {})  # no public way to reach them

    def kill(self, pids: set[int]) -> None:
        """Kill these workers: they will not count as having died on their own."""
        for pid, process in self.processes().items():
            if pid in pids:
                self._killed_by_pool.add(pid)
                process.kill()

    def kill_all(self) -> None:
        self.kill(set(self.processes()))

    def retire(self) -> None:
        """Stop taking calls; keep hold of the workers to read their exit codes.

        Calls already handed over are not cancelled here: the breakage fails
        them, and each learns from ``crashed_slots`` whether it crashed.
        """
        self._processes = self.processes()
        manager = self.executor._executor_manager_thread  # typeshed mistypes it as a wakeup pipe
        self._manager = manager if isinstance(manager, threading.Thread) else None
        self.executor.shutdown(wait=False, cancel_futures=False)

    async def crashed_slots(self, marks: StartMarks, count_crash: Callable[[Task], object]) -> frozenset[int]:
        """The slots whose calls were running in a worker that died, each counted once as a crash.

        Judged once per generation, after all its workers have exited (so no
        worker writes a start mark any more), for all its calls at once (so
        every crash is counted before any of its calls is handed over again).
        """
        async with self._judging:
            if self._crashed is None:
                culprits = await self._died_on_their_own()
                self._crashed = frozenset(
                    slot for slot, call in self.calls.items() if marks.started_in(slot, call.number) in culprits
                )
                for slot in self._crashed:
                    count_crash(self.calls[slot].task)
            return self._crashed

    async def _died_on_their_own(self) -> set[int]:
        exit_codes = await self._exit_codes()
        died = {pid for pid, code in exit_codes.items() if code != STOPPED_BY_EXECUTOR} - self._killed_by_pool
        if died or self._killed_by_pool:
            return died
        return set(exit_codes)

    async def _exit_codes(self) -> dict[int, int | None]:
        """Once the executor's own thread has stopped and joined every worker, their exit codes."""
        if self._manager is not None:
            await asyncio.to_thread(self._manager.join, EXIT_WAIT)
        self._kill_stragglers()
        return {pid: process.exitcode for pid, process in self._processes.items()}

    def _kill_stragglers(self) -> None:
        for pid, process in self._processes.items():
            if process.exitcode is None:
                self._killed_by_pool.add(pid)
                process.kill()
