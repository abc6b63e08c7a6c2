"""The process pool of cpu_bound listeners, rebuilt whenever it breaks.

A worker that dies (killed, out of memory, a crash in C code) breaks a
ProcessPoolExecutor for good; every task in it fails with BrokenProcessPool.
The pool then replaces the executor, once per breakage, and the failed tasks
become ``worker-crash`` errors for their callers. A worker that outlives even
the in-worker timeout is killed the same way.

A call's deadline must not run out while it merely waits behind others, or a
long line of calls, each well within its timeout, would look like a stuck
worker. So calls wait in the pool's own line, and only a few per worker are
handed to the executor at a time (enough to keep every worker busy while
results travel back); each handed-over call's deadline covers its own run plus
the runs of every call handed over before it and still in flight.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from xml_pipeline.memory.factory import BackendSpec
from xml_pipeline.process_pool import worker
from xml_pipeline.process_pool.worker import Outcome, Task

log = logging.getLogger("xml_pipeline.pool")

STUCK_GRACE = 5.0
"""Seconds past a task's timeout before the pool gives up on its worker and kills it."""

HANDED_OVER_PER_WORKER = 4
"""Calls with the executor at once, per worker; the rest wait in the pool's line."""


class WorkerCrashed(Exception):
    pass


class WorkerStuck(Exception):
    pass


class CpuPool:
    def __init__(
        self,
        *,
        workers: int | None,
        max_tasks_per_child: int | None,
        backend_spec: BackendSpec,
        max_slots_per_thread: int,
        max_threads: int,
    ) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.max_tasks_per_child = max_tasks_per_child
        self._initargs = (backend_spec, max_slots_per_thread, max_threads, os.getpid())
        self._executor = self._new_executor()
        self.rebuilds = 0
        self._handed_over = asyncio.Semaphore(HANDED_OVER_PER_WORKER * self.workers)
        self._allowances: list[float] = []
        """How long each call now with the executor may run; together they bound a new call's wait."""

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.initialize,
            initargs=self._initargs,
            max_tasks_per_child=self.max_tasks_per_child,
        )

    async def warm_up(self) -> list[int]:
        """Start every worker now rather than on the first message; return their pids."""
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._executor, worker.pid) for _ in range(self.workers)]
        return list(await asyncio.gather(*futures))

    async def run(self, task: Task) -> Outcome:
        """Run ``task`` in a worker; WorkerCrashed or WorkerStuck when the worker is lost.

        Waiting in line for a worker has no deadline of its own: it ends as the
        calls ahead end, and each of those is bounded by this same deadline.
        """
        async with self._handed_over:
            allowance = task.timeout + worker.HARD_DEADLINE_GRACE
            ahead = sum(self._allowances)  # the executor runs calls in order: these all start first
            self._allowances.append(allowance)
            try:
                return await self._run_handed_over(task, allowance + ahead + STUCK_GRACE)
            finally:
                self._allowances.remove(allowance)

    async def _run_handed_over(self, task: Task, deadline: float) -> Outcome:
        executor = self._executor
        try:
            future = executor.submit(worker.run_task, task)
        except (BrokenExecutor, RuntimeError):
            self._replace(executor, "it was broken")
            raise WorkerCrashed("the worker pool was broken; it has been rebuilt") from None
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.wrap_future(future)
        except BrokenProcessPool:
            self._replace(executor, "a worker died")
            raise WorkerCrashed("the worker process died during the call; the pool has been rebuilt") from None
        except TimeoutError:
            self._kill(executor)
            self._replace(executor, "a worker did not come back from a timed-out call")
            raise WorkerStuck(f"the worker did not stop within {task.timeout:g}s; it was killed") from None

    def _replace(self, broken: ProcessPoolExecutor, why: str) -> None:
        if broken is not self._executor:
            return  # another task already replaced it
        log.warning("rebuilding the worker pool: %s", why)
        self._executor = self._new_executor()
        self.rebuilds += 1
        broken.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _kill(executor: ProcessPoolExecutor) -> None:
        for process in list((executor._processes or {}).values()):  # no public way to reach them
            process.kill()

    def worker_pids(self) -> list[int]:
        return [pid for pid in (self._executor._processes or {}) if pid is not None]

    async def close(self, *, kill: bool = False) -> None:
        """Stop the workers; with ``kill``, do not wait for running tasks."""
        if kill:
            self._kill(self._executor)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
