"""The process pool of cpu_bound listeners, rebuilt whenever it breaks.

A worker that dies (killed, out of memory, a crash in C code, an exit from
the handler) breaks a ProcessPoolExecutor for good: it fails every call it
holds and stops its other workers. The pool replaces the executor, once per
breakage, and then tells the calls apart (see ``generation``):

- the call that was running in the worker that died gets ``worker-crash``
  (WorkerCrashed), and counts as one crash of its payload;
- every other call is handed to the new executor and runs from the start:
  one that had not started yet runs for the first time; one that was running
  in another worker was stopped with it, its result lost, and runs again. So
  a cpu_bound handler may run more than once for one message when a
  neighbour crashes (at-least-once), and should be safe to repeat.

A payload that crashed a worker MAX_CRASHES times in a row is refused with
``worker-crash`` without running (see ``crash_record``), so a payload that
always crashes, however often its caller retries it, breaks the pool a
bounded number of times. Every breakage either fails a call or was caused
from outside the pool, so the other calls are run again only finitely often.
A worker that outlives even the in-worker timeout is killed (only that one)
and the pool rebuilt the same way; its call gets WorkerStuck.

A call's deadline must not run out while it merely waits behind others, or a
long line of calls, each well within its timeout, would look like a stuck
worker. So calls wait in the pool's own line, and only a few per worker are
handed to the executor at a time (enough to keep every worker busy while
results travel back); each handed-over call's deadline covers its own run plus
the runs of every other call handed over and still in flight.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor

from xml_pipeline.memory.factory import BackendSpec
from xml_pipeline.process_pool import worker
from xml_pipeline.process_pool.crash_record import CrashRecord
from xml_pipeline.process_pool.generation import Generation, HandOver
from xml_pipeline.process_pool.started import NOT_STARTED, StartMarks
from xml_pipeline.process_pool.worker import Outcome, Task

log = logging.getLogger("xml_pipeline.pool")

STUCK_GRACE = 5.0
"""Seconds past a task's timeout before the pool gives up on its worker and kills it."""

HANDED_OVER_PER_WORKER = 4
"""Calls with the executor at once, per worker; the rest wait in the pool's line."""


class WorkerCrashed(Exception):
    pass


class PayloadRefused(WorkerCrashed):
    """The payload crashed a worker too many times in a row; running it again would only crash another."""


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
        slots = HANDED_OVER_PER_WORKER * self.workers
        self._marks = StartMarks(slots)
        self._initargs = (backend_spec, max_slots_per_thread, max_threads, os.getpid(), self._marks)
        self._generation = Generation(self._new_executor())
        self.rebuilds = 0
        self.crashes = CrashRecord()
        self._closing = False
        self._free_slots: asyncio.Queue[int] = asyncio.Queue(maxsize=slots)
        """The pool's line: a call waits here for a slot, then is handed to the executor."""
        for slot in range(slots):
            self._free_slots.put_nowait(slot)
        self._allowances: dict[int, float] = {}
        """How long the call in each taken slot may run; together they bound a new call's wait."""

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
        executor = self._generation.executor
        futures = [loop.run_in_executor(executor, worker.pid) for _ in range(self.workers)]
        return list(await asyncio.gather(*futures))

    async def run(self, task: Task) -> Outcome:
        """Run ``task`` in a worker; WorkerCrashed or WorkerStuck when its worker is lost.

        A call lost only because another call crashed the executor runs
        again, as often as that happens (see the module docstring).

        Waiting in line for a worker has no deadline of its own: it ends as the
        calls ahead end, and each of those is bounded by this same deadline.
        """
        slot = await self._free_slots.get()
        try:
            self._allowances[slot] = task.timeout + worker.HARD_DEADLINE_GRACE
            while (outcome := await self._hand_over(self._generation, slot, task)) is None:
                log.info("running a call again: a neighbour's crash stopped it")
            self.crashes.forget(task)
            return outcome
        finally:
            del self._allowances[slot]
            self._free_slots.put_nowait(slot)

    async def _hand_over(self, generation: Generation, slot: int, task: Task) -> Outcome | None:
        """Run ``task`` once in ``generation``: its outcome, or None if another call's crash lost it."""
        if self._closing:
            raise WorkerCrashed("the worker pool is shutting down")
        if self.crashes.refuses(task):
            raise PayloadRefused(f"refused: this payload crashed a worker {self.crashes.crashes(task)} times in a row")
        call = HandOver(slot, self._marks.next_hand_over(), task)
        allowance = self._allowances[slot]
        ahead = sum(self._allowances.values()) - allowance  # the executor may run all of these first
        generation.calls[slot] = call
        try:
            future = generation.executor.submit(worker.run_in_slot, slot, call.number, task)
            async with asyncio.timeout(allowance + ahead + STUCK_GRACE):
                return await asyncio.wrap_future(future)
        except BrokenExecutor:
            await self._after_breakage(generation, call)
            return None
        except TimeoutError:
            self._kill_stuck(generation, call)
            raise WorkerStuck(f"the worker did not stop within {task.timeout:g}s; it was killed") from None
        finally:
            del generation.calls[slot]

    async def _after_breakage(self, generation: Generation, call: HandOver) -> None:
        """Raise WorkerCrashed if ``call`` was running in the worker that died; else it may run again."""
        self._retire(generation, "a worker died")
        if self._closing:
            raise WorkerCrashed("the worker pool was stopped during the call")
        if call.slot in await generation.crashed_slots(self._marks, self.crashes.count_crash):
            crashes = self.crashes.crashes(call.task)
            raise WorkerCrashed(
                f"the worker process died during the call (crash {crashes} of this payload;"
                f" it is refused after {self.crashes.max_crashes}); the pool has been rebuilt"
            )

    def _kill_stuck(self, generation: Generation, call: HandOver) -> None:
        pid = self._marks.started_in(call.slot, call.number)
        if pid == NOT_STARTED:
            generation.kill_all()  # the executor started nothing in all this time: none of its workers moves
        else:
            generation.kill({pid})
        self._retire(generation, "a worker did not come back from a timed-out call")

    def _retire(self, generation: Generation, why: str) -> None:
        if generation is not self._generation or self._closing:
            return  # another call already replaced it, or close() is shutting it down
        generation.retire()
        log.warning("rebuilding the worker pool: %s", why)
        self._generation = Generation(self._new_executor())
        self.rebuilds += 1

    def worker_pids(self) -> list[int]:
        return list(self._generation.processes())

    async def close(self, *, kill: bool = False) -> None:
        """Stop the workers; with ``kill``, do not wait for running tasks."""
        self._closing = True
        if kill:
            self._generation.kill_all()
        await asyncio.to_thread(self._generation.executor.shutdown, wait=True, cancel_futures=True)
