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
handed over at a time (enough to keep every worker busy while results travel
back); each handed-over call's deadline covers its own run plus the runs of
every other call handed over and still in flight.

The executor owns the processes, but calls and outcomes do not pass through
it: each worker connects back to the pool's socket (see ``channel`` and
``generation``), so a call costs the event loop one write and its outcome one
read, with no thread in between.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from xml_pipeline.memory.factory import BackendSpec
from xml_pipeline.process_pool import worker
from xml_pipeline.process_pool.channel import WorkerChannel
from xml_pipeline.process_pool.crash_record import CrashRecord
from xml_pipeline.process_pool.door import WorkerDoor
from xml_pipeline.process_pool.generation import EXIT_WAIT, Generation, HandOver, Sessions
from xml_pipeline.process_pool.started import NOT_STARTED, StartMarks
from xml_pipeline.process_pool.wire import Hello
from xml_pipeline.process_pool.worker import Outcome, Task

log = logging.getLogger("xml_pipeline.pool")

STUCK_GRACE = 5.0
"""Seconds past a task's timeout before the pool gives up on its worker and kills it."""

HANDED_OVER_PER_WORKER = 4
"""Calls handed over at once, per worker; the rest wait in the pool's line."""

WARM_UP_TIMEOUT = 120.0
"""Seconds for every worker to start and connect before the pool is held not to start."""


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
        self._loop = asyncio.get_running_loop()
        self._door = WorkerDoor(self._loop, 4 * self.workers, self._admit)
        self._sessions = Sessions(
            self._door.address, self._door.token, self.workers, HANDED_OVER_PER_WORKER, max_tasks_per_child
        )
        self.rebuilds = 0
        self.crashes = CrashRecord()
        self._closing = False
        self._generations = 0
        self._retired: list[Generation] = []
        """Replaced generations whose sockets stay open until their workers are gone."""
        self._generation = self._new_generation()
        self._free_slots: asyncio.Queue[int] = asyncio.Queue(maxsize=slots)
        """The pool's line: a call waits here for a slot, then is handed to a worker."""
        for slot in range(slots):
            self._free_slots.put_nowait(slot)
        self._allowances: dict[int, float] = {}
        """How long the call in each taken slot may run; together they bound a new call's wait."""

    def _new_generation(self) -> Generation:
        executor = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.initialize,
            initargs=self._initargs,
            # a session is one task of the executor; it ends after max_tasks_per_child calls
            max_tasks_per_child=1 if self.max_tasks_per_child else None,
        )
        self._generations += 1
        return Generation(executor, self._generations, self._sessions, self._on_broken)

    async def warm_up(self) -> list[int]:
        """Wait until every worker has started and connected; return their pids. BrokenProcessPool if they cannot."""
        try:
            async with asyncio.timeout(WARM_UP_TIMEOUT):
                return await self._generation.connected()
        except TimeoutError:
            raise BrokenProcessPool(f"the workers did not start within {WARM_UP_TIMEOUT:g}s") from None

    def _admit(self, channel: WorkerChannel, hello: Hello) -> None:
        """A worker connected: it joins its generation (a replaced one keeps it idle until it is stopped)."""
        for generation in [self._generation, *self._retired]:
            if generation.number == hello.generation:
                generation.attach(channel, hello)
                return
        channel.close()  # its generation's workers are all gone: so is this one, or it soon will be

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
        ahead = sum(self._allowances.values()) - allowance  # the workers may run all of these first
        generation.calls[slot] = call
        try:
            future = generation.submit(call)
            async with asyncio.timeout(allowance + ahead + STUCK_GRACE):
                return await future
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

    def _on_broken(self, generation: Generation) -> None:
        """Replace a broken generation at once, so that idle workers are back before the next call.

        Unless none of its workers ever connected: workers that cannot start
        would be respawned in a loop. The next call replaces such a generation.
        """
        if generation.served:
            self._retire(generation, "a worker died")

    def _retire(self, generation: Generation, why: str) -> None:
        if generation is not self._generation or self._closing:
            return  # another call already replaced it, or close() is shutting it down
        generation.retire()
        log.warning("rebuilding the worker pool: %s", why)
        self._close_gone_generations()
        self._retired.append(generation)
        self._generation = self._new_generation()
        self.rebuilds += 1

    def _close_gone_generations(self) -> None:
        """Close the sockets of replaced generations whose workers have all exited by now."""
        for generation in [generation for generation in self._retired if generation.workers_gone()]:
            generation.close_sockets()
            self._retired.remove(generation)

    @property
    def address(self) -> str:
        """The socket the workers connect back to."""
        return self._sessions.address

    def worker_pids(self) -> list[int]:
        return list(self._generation.processes())

    async def close(self, *, kill: bool = False) -> None:
        """Stop the workers; with ``kill``, do not wait for running calls.

        Without it, each worker runs the calls it holds (each bounded by its
        timeout) and ends its session; calls not handed to a worker yet fail.
        """
        self._closing = True
        generation = self._generation
        if kill:
            generation.kill_all()
        generation.stop_sessions()
        allowed = sum(self._allowances.values()) + STUCK_GRACE + EXIT_WAIT
        shutdown = functools.partial(generation.executor.shutdown, wait=True, cancel_futures=True)
        stopped = self._loop.run_in_executor(None, shutdown)
        try:
            done, _ = await asyncio.wait({stopped}, timeout=allowed)
            if not done:
                log.warning("worker pool: workers still busy %gs after close; killing them", allowed)
                generation.kill_all()
                done, _ = await asyncio.wait({stopped}, timeout=EXIT_WAIT)
            if not done:
                log.error("worker pool: the executor did not stop within %gs of killing its workers", EXIT_WAIT)
        finally:
            self._door.close()
            for retired in [*self._retired, generation]:
                retired.close_sockets()
            self._retired.clear()
