"""One ProcessPoolExecutor of the pool, from its start until it breaks, and who broke it.

When a worker dies, the executor breaks: it stops its other workers with
SIGTERM, and the generation fails every call it holds. Once all of them have exited, their exit codes tell the
dead worker from the ones the executor stopped: a worker that exited any other
way than by that SIGTERM (killed, out of memory, a crash in C code, an exit
from the handler) died on its own, and the calls it had started are the ones
that crashed. Workers the pool killed itself (a stuck call) are not counted
as having died on their own. If no worker stands out (one ended by a SIGTERM
from elsewhere), every call that had started is held to have crashed, so that
a call which kills its worker that way cannot be run again forever.

Calls do not travel through the executor: each worker runs one long session
call of the executor (``worker.serve``) that connects back to the pool, and
the generation hands its calls to those sessions over their sockets (see
``channel``), the least loaded first, a few per worker at a time. With
max_tasks_per_child, a session ends after that many calls and its process
exits; the executor spawns the next process, and the generation submits a
session for it.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from xml_pipeline.process_pool import worker
from xml_pipeline.process_pool.channel import WorkerChannel
from xml_pipeline.process_pool.started import StartMarks
from xml_pipeline.process_pool.wire import Hello
from xml_pipeline.process_pool.worker import Outcome, Task

EXIT_WAIT = 10.0
"""Seconds to wait for a broken executor's workers to exit before killing the rest."""

STOPPED_BY_EXECUTOR = -signal.SIGTERM


@dataclass(frozen=True, slots=True)
class HandOver:
    """A call as handed to a generation: its slot in the pool's line and the number of this hand-over."""

    slot: int
    number: int
    task: Task


@dataclass(frozen=True, slots=True)
class Sessions:
    """How a generation's workers reach the pool, and how much each of them is given."""

    address: str
    token: bytes
    workers: int
    calls_per_worker: int
    """Calls sent to one worker and not yet answered, at most: enough that it never waits for the next."""
    calls_per_session: int | None
    """max_tasks_per_child: calls after which a worker's session ends and its process is replaced."""


class Generation:
    def __init__(
        self, executor: ProcessPoolExecutor, number: int, sessions: Sessions, on_broken: Callable[[Generation], None]
    ) -> None:
        self.executor = executor
        self.number = number
        self.calls: dict[int, HandOver] = {}
        """The calls handed to this generation and not yet answered, by slot."""
        self.broken: str | None = None
        """Why the generation broke, once it has."""
        self._sessions = sessions
        self._on_broken = on_broken
        self._loop = asyncio.get_running_loop()
        self._channels: dict[int, WorkerChannel] = {}
        """The workers connected and serving, by pid."""
        self._spent: list[WorkerChannel] = []
        """Channels no longer used whose sockets close with the generation (see ``WorkerChannel.abandon``)."""
        self._waiting: deque[tuple[HandOver, asyncio.Future[Outcome]]] = deque()
        """Calls handed over while every worker had its fill; sent as outcomes make room."""
        self._running_sessions: set[asyncio.Future[None]] = set()
        self._all_connected = asyncio.Event()
        self.served = False
        """Whether any worker ever connected: a generation that never served is not rebuilt unasked."""
        self._retired = False
        self._closing = False
        """Whether the pool is closing: a worker that connects now is told to stop at once."""
        self._processes: dict[int, BaseProcess] = {}
        self._manager: threading.Thread | None = None
        self._killed_by_pool: set[int] = set()
        self._crashed: frozenset[int] | None = None
        self._judging = asyncio.Lock()
        for _ in range(sessions.workers):
            self._start_session()

    # ---------------------------------------------------------------- sessions and calls

    def _start_session(self) -> None:
        sessions = self._sessions
        try:
            started = self.executor.submit(worker.serve, sessions.address, sessions.token, self.number)
        except (BrokenExecutor, RuntimeError) as exc:  # broken, or shut down by now
            self.break_down(f"a worker session could not start: {exc}")
            return
        session = asyncio.wrap_future(started, loop=self._loop)
        self._running_sessions.add(session)
        session.add_done_callback(self._session_ended)

    def _session_ended(self, session: asyncio.Future[None]) -> None:
        self._running_sessions.discard(session)
        failure = None if session.cancelled() else session.exception()
        if failure is not None:
            self.break_down(f"a worker session ended with {type(failure).__name__}: {failure}")
        elif not self._retired and self.broken is None:
            self._start_session()  # its process reached max_tasks_per_child: one for its successor

    def attach(self, channel: WorkerChannel, hello: Hello) -> None:
        """A worker of this generation connected: give it calls."""
        if self.broken is not None or (self._retired and not self._closing):
            self._spent.append(channel)  # its executor is stopping it
            channel.abandon()
            return
        channel.owner = self
        channel.pid = hello.pid
        self.served = True
        self._channels[hello.pid] = channel
        if self._closing:  # it started too late to be told with the others
            channel.stop()
            return
        if len(self._channels) >= self._sessions.workers:
            self._all_connected.set()
        self._dispatch()

    async def connected(self) -> list[int]:
        """Once every worker has connected, their pids; BrokenProcessPool if the generation broke first."""
        await self._all_connected.wait()
        if self.broken is not None:
            raise BrokenProcessPool(self.broken)
        return list(self._channels)

    def submit(self, call: HandOver) -> asyncio.Future[Outcome]:
        """Hand ``call`` to a worker, now or as soon as one has room; its future has the outcome."""
        future: asyncio.Future[Outcome] = self._loop.create_future()
        if self.broken is not None:
            future.set_exception(BrokenProcessPool(self.broken))
        else:
            self._waiting.append((call, future))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        waiting = self._waiting
        limit = self._sessions.calls_per_worker
        per_session = self._sessions.calls_per_session
        while waiting:
            channel = _least_loaded_open(self._channels.values(), limit)
            if channel is None:
                return
            call, future = waiting.popleft()
            if future.done():
                continue  # its caller gave up waiting
            channel.send(call.slot, call.number, call.task, future)
            if per_session is not None and channel.sent >= per_session:
                channel.stop()

    # the channels' owner

    def greeted(self, channel: WorkerChannel, hello: Hello | None) -> None:  # pragma: no cover - the door greets
        raise AssertionError("a channel is attached after its greeting")

    def answered(self, channel: WorkerChannel) -> None:
        if self._waiting:
            self._dispatch()

    def closed(self, channel: WorkerChannel, held_calls: bool) -> None:
        self._channels.pop(channel.pid, None)
        if held_calls or not channel.stopping:
            self.break_down(f"worker {channel.pid} was lost")

    def break_down(self, why: str) -> None:
        """The executor broke or is breaking: fail every call (each is judged later) and tell the pool."""
        if self.broken is not None:
            return
        self.broken = why
        self._all_connected.set()
        for channel in self._channels.values():
            channel.abandon()
            self._spent.append(channel)
        self._channels.clear()
        waiting, self._waiting = self._waiting, deque()
        for _, future in waiting:
            if not future.done():
                future.set_exception(BrokenProcessPool(why))
        self._on_broken(self)

    def stop_sessions(self) -> None:
        """Let every worker finish what it holds and end its session; fail the calls not sent yet.

        For the pool's close: it waits for the sessions to end.
        """
        self._retired = True
        self._closing = True
        for channel in self._channels.values():
            channel.stop()
        waiting, self._waiting = self._waiting, deque()
        for _, future in waiting:
            if not future.done():
                future.set_exception(BrokenProcessPool("the worker pool is closing"))

    def workers_gone(self) -> bool:
        """Whether the executor's own thread has stopped, so no worker of this generation runs any more."""
        return self._manager is None or not self._manager.is_alive()

    def close_sockets(self) -> None:
        """Once its workers are gone: close what is left of their channels."""
        for channel in [*self._channels.values(), *self._spent]:
            channel.close()
        self._channels.clear()
        self._spent.clear()

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
        self._retired = True
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


def _load(channel: WorkerChannel) -> int:
    return channel.load


def _least_loaded_open(channels: Iterable[WorkerChannel], limit: int) -> WorkerChannel | None:
    open_channels = [channel for channel in channels if channel.load < limit and not channel.stopping]
    return min(open_channels, key=_load, default=None)
