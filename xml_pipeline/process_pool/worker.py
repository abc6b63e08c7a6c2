"""What runs inside a worker process.

A task crosses the process boundary as a few strings and the payload's XML;
the outcome comes back the same way. The worker imports the handler and the
payload class itself (cached per process), decodes and validates the payload,
runs the async handler on its own event loop, and encodes what the handler
returned. It reads and writes thread and history state through the configured
shared backend, installed as the process-wide registry and context buffer.

Timeouts are enforced inside the worker: an awaiting handler is cancelled at
the deadline, and a handler stuck in pure-Python computation is interrupted
by SIGALRM a moment later. Either way the worker survives for the next task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import operator
import os
import signal
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from xml_pipeline.handler import HandlerMetadata, HandlerResponse
from xml_pipeline.imports import import_object
from xml_pipeline.memory.context_buffer import ContextBuffer, set_context_buffer
from xml_pipeline.memory.manager_backend import ManagerBackend, ManagerSpec
from xml_pipeline.memory.redis_backend import RedisBackend, RedisSpec
from xml_pipeline.message.payload_codec import PayloadDecodeError, PayloadTypeError, codec_for, payload_type_name
from xml_pipeline.message.safe_xml import XmlRejected
from xml_pipeline.message_bus.thread_registry import ThreadRegistry, set_registry
from xml_pipeline.process_pool.orphans import exit_with_parent
from xml_pipeline.process_pool.started import StartMarks
from xml_pipeline.process_pool.wire import STOP, Closed, Hello, frame, read_message

HARD_DEADLINE_GRACE = 1.0
"""Seconds after the timeout before SIGALRM interrupts a handler that does not await."""


@dataclass(frozen=True, slots=True)
class Task:
    handler_path: str
    payload_type: str
    payload_xml: bytes
    metadata: HandlerMetadata
    timeout: float
    traceparent: str | None = None
    """The trace context of the daemon's span for this call (OpenTelemetry), continued in the worker."""

    def packed(self) -> tuple[Any, ...]:
        """The task as plain values, for the socket: they pickle in a tenth of the time the dataclasses take."""
        return (
            self.handler_path,
            self.payload_type,
            self.payload_xml,
            _metadata_values(self.metadata),
            self.timeout,
            self.traceparent,
        )

    @classmethod
    def unpacked(cls, values: tuple[Any, ...]) -> Task:
        handler_path, payload_type, payload_xml, metadata, timeout, traceparent = values
        return cls(handler_path, payload_type, payload_xml, HandlerMetadata(*metadata), timeout, traceparent)


_metadata_values = operator.attrgetter(*(field.name for field in dataclasses.fields(HandlerMetadata)))


@dataclass(frozen=True, slots=True)
class Outcome:
    """``kind``: response, none, raised, timeout, bad."""

    kind: str
    to: str | None = None
    payload_type: str = ""
    payload_xml: bytes = b""
    detail: str = ""
    worker_pid: int = 0

    def packed(self) -> tuple[Any, ...]:
        """The outcome as plain values, for the socket (see ``Task.packed``)."""
        return _outcome_values(self)

    @classmethod
    def unpacked(cls, values: tuple[Any, ...]) -> Outcome:
        return cls(*values)


_outcome_values = operator.attrgetter(*(field.name for field in dataclasses.fields(Outcome)))


class _HardTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so handlers' ``except Exception`` cannot swallow it."""


_loop: asyncio.AbstractEventLoop | None = None
_marks: StartMarks | None = None


def initialize(
    backend_spec: ManagerSpec | RedisSpec | None,
    max_slots_per_thread: int,
    max_threads: int,
    parent_pid: int,
    marks: StartMarks,
) -> None:
    """Pool initializer: die with the daemon, connect to the shared state, prepare the loop."""
    global _loop, _marks
    _marks = marks
    exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle, not each worker's
    signal.signal(signal.SIGALRM, _on_alarm)
    if backend_spec is not None:
        backend = (
            ManagerBackend.connect(backend_spec)
            if isinstance(backend_spec, ManagerSpec)
            else RedisBackend.from_spec(backend_spec)
        )
        set_registry(ThreadRegistry(backend))
        set_context_buffer(ContextBuffer(backend, max_slots_per_thread=max_slots_per_thread, max_threads=max_threads))
    _loop = asyncio.new_event_loop()


def _on_alarm(signum: int, frame: object) -> None:
    raise _HardTimeout


def serve(address: str, token: bytes, generation: int) -> None:
    """One session: connect to the pool, then run the calls it sends, one at a time, until it says stop.

    Runs as a single long call of the executor, so the executor still owns the
    process (its spawn, its death, its replacement). Each call is marked
    started here before it runs, so that a crash of this process is blamed on
    it alone; each outcome is sent back as soon as it is ready.
    """
    assert _marks is not None, "initialize() runs first"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(address)
        sock.sendall(Hello(token, generation, os.getpid()).framed())
        with sock.makefile("rb") as incoming:
            while True:
                try:
                    message = read_message(incoming)
                except Closed:
                    return  # the pool is gone; the executor or the orphan watch ends this process
                if message is STOP:
                    return
                slot, number, task = message
                _marks.mark_started_here(slot, number)
                try:
                    outcome = run_task(Task.unpacked(task))
                except _HardTimeout:  # the alarm went off just as the handler returned
                    outcome = Outcome("timeout", worker_pid=os.getpid())
                sock.sendall(frame((number, outcome.packed())))


def run_task(task: Task) -> Outcome:
    global _loop
    pid = os.getpid()
    assert _loop is not None, "initialize() runs first"
    try:
        handler = import_object(task.handler_path)
        payload = codec_for(import_object(task.payload_type)).from_bytes(task.payload_xml)
    except (ImportError, AttributeError, PayloadDecodeError, XmlRejected) as exc:
        return Outcome("raised", detail=f"the worker could not prepare the call: {exc}", worker_pid=pid)
    signal.setitimer(signal.ITIMER_REAL, task.timeout + HARD_DEADLINE_GRACE)
    try:
        with _trace_continued(task):
            result = _loop.run_until_complete(_within(task.timeout, handler(payload, task.metadata)))
    except (_Expired, _HardTimeout):
        _loop = _fresh_loop(_loop)  # an interrupted loop may be in any state
        return Outcome("timeout", worker_pid=pid)
    except Exception as exc:
        return Outcome("raised", detail=f"{type(exc).__name__}: {exc}", worker_pid=pid)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if result is None:
        return Outcome("none", worker_pid=pid)
    if not isinstance(result, HandlerResponse):
        return Outcome("bad", detail=f"returned {type(result).__name__}", worker_pid=pid)
    try:
        payload_xml = codec_for(type(result.payload)).to_bytes(result.payload)
    except PayloadTypeError as exc:
        return Outcome("bad", detail=f"responded with something that cannot travel as XML: {exc}", worker_pid=pid)
    return Outcome("response", result.to, payload_type_name(type(result.payload)), payload_xml, worker_pid=pid)


def _trace_continued(task: Task) -> contextlib.AbstractContextManager[None]:
    """The daemon's trace, continued around the call when the task carries one and OpenTelemetry is installed."""
    if task.traceparent is None:
        return contextlib.nullcontext()
    try:
        from xml_pipeline.observe.otel import continued
    except ImportError:
        return contextlib.nullcontext()
    return continued(task.traceparent, f"run {task.metadata.own_name}")


class _Expired(Exception):
    """The handler's own deadline passed (a TimeoutError the handler raised is its error, not this)."""


async def _within(seconds: float, call: Coroutine[Any, Any, Any]) -> Any:
    """Await ``call`` for at most ``seconds``: one task, where wait_for would make two."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            return await call
    except TimeoutError:
        if deadline.expired():
            raise _Expired from None
        raise


def _fresh_loop(old: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    try:
        for task in asyncio.all_tasks(old):
            task.cancel()
        old.close()
    except Exception:  # closing a loop torn by a signal may fail; the new one is what matters
        pass
    return asyncio.new_event_loop()
