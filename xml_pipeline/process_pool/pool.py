"""The process pool of cpu_bound listeners, rebuilt whenever it breaks.

A worker that dies (killed, out of memory, a crash in C code) breaks a
ProcessPoolExecutor for good; every task in it fails with BrokenProcessPool.
The pool then replaces the executor, once per breakage, and the failed tasks
become ``worker-crash`` errors for their callers. A worker that outlives even
the in-worker timeout is killed the same way.
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
        """Run ``task`` in a worker; WorkerCrashed or WorkerStuck when the worker is lost."""
        executor = self._executor
        try:
            future = executor.submit(worker.run_task, task)
        except (BrokenExecutor, RuntimeError):
            self._replace(executor, "it was broken")
            raise WorkerCrashed("the worker pool was broken; it has been rebuilt") from None
        try:
            async with asyncio.timeout(task.timeout + worker.HARD_DEADLINE_GRACE + STUCK_GRACE):
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
