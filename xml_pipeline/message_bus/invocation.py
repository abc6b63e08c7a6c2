"""Pipeline step 7: call a handler, in this process or in the pool, and say how it went.

Whatever the handler does (returns, raises, overruns its timeout, kills its
worker), the caller gets either what the handler returned or a Failure that
names what happened; nothing escapes. Slots and metrics stay with the engine
that calls this, since the in-process pump and the durable engine count them
differently.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from typing import Any

from xml_pipeline.handler import HandlerMetadata, HandlerResponse
from xml_pipeline.imports import import_object
from xml_pipeline.message.payload_codec import PayloadDecodeError, codec_for
from xml_pipeline.message.safe_xml import XmlLimits, XmlRejected
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.deadlines import Deadlines
from xml_pipeline.message_bus.outcome import Failure
from xml_pipeline.organism import Listener
from xml_pipeline.process_pool.pool import CpuPool, PayloadRefused, WorkerCrashed, WorkerStuck
from xml_pipeline.process_pool.worker import Outcome, Task

log = logging.getLogger("xml_pipeline.pump")


async def call_in_process(listener: Listener, payload: Any, metadata: HandlerMetadata) -> Any:
    """Run ``listener``'s handler here under its timeout: its result, or a Failure."""
    deadline = asyncio.timeout(listener.timeout_seconds)
    try:
        async with deadline:
            return await listener.handler(payload, metadata)
    except TimeoutError as exc:
        if deadline.expired():
            return Failure(
                ErrorCode.HANDLER_TIMEOUT, f"{listener.name} did not finish within {listener.timeout_seconds:g}s"
            )
        return handler_raised(listener, metadata, exc)
    except Exception as exc:
        return handler_raised(listener, metadata, exc)


async def call_watched(
    listener: Listener, payload: Any, metadata: HandlerMetadata, deadlines: Deadlines, task: asyncio.Task[None]
) -> Any:
    """:func:`call_in_process` in ``task`` (the current one), with the deadline kept by ``deadlines`` (one timer
    for every call) instead of a timer of its own: the same outcomes, for the in-process pump's every hop."""
    seconds = listener.timeout_seconds
    watch = deadlines.watch(task, seconds)
    try:
        result = await listener.handler(payload, metadata)
    except asyncio.CancelledError:
        if deadlines.finish(watch, seconds, cancelled=True):
            return Failure(ErrorCode.HANDLER_TIMEOUT, f"{listener.name} did not finish within {seconds:g}s")
        raise
    except Exception as exc:
        deadlines.finish(watch, seconds)
        return handler_raised(listener, metadata, exc)
    deadlines.finish(watch, seconds)
    return result


ARRIVED_AS: ContextVar[bytes] = ContextVar("xml_pipeline_arrived_as", default=b"")
"""The XML of the payload an eager listener's handler was given, while it runs: the pump's own
collectors keep an answer's text as it arrived instead of writing the answer out again."""


async def call_at_once(listener: Listener, payload: Any, metadata: HandlerMetadata, payload_xml: bytes) -> Any:
    """Run an eager listener's handler (:attr:`Listener.eager`), which returns without awaiting, so it needs
    no deadline: its result, or a Failure if it raised. It runs in a context of its own
    (:func:`~xml_pipeline.message_bus.eager.run_now`), where :data:`ARRIVED_AS` is ``payload_xml``."""
    ARRIVED_AS.set(payload_xml)
    try:
        return await listener.handler(payload, metadata)
    except Exception as exc:
        return handler_raised(listener, metadata, exc)


async def call_in_worker(pool: CpuPool, listener: Listener, task: Task, limits: XmlLimits) -> Any:
    """Run a cpu_bound handler in the pool: the same outcomes as :func:`call_in_process`."""
    try:
        outcome = await pool.run(task)
    except PayloadRefused as exc:
        return Failure(ErrorCode.CRASH_LOOP, f"{listener.name}: {exc}")
    except WorkerCrashed as exc:
        return Failure(ErrorCode.WORKER_CRASH, f"{listener.name}: {exc}")
    except WorkerStuck as exc:
        return Failure(ErrorCode.HANDLER_TIMEOUT, f"{listener.name}: {exc}")
    return _result_of(listener, outcome, limits)


def _result_of(listener: Listener, outcome: Outcome, limits: XmlLimits) -> Any:
    if outcome.kind == "none":
        return None
    if outcome.kind == "response":
        try:
            payload = codec_for(import_object(outcome.payload_type)).from_bytes(outcome.payload_xml, limits)
        except XmlRejected as refused:
            return Failure(refused.code, f"{listener.name} returned a payload beyond the limits: {refused.detail}")
        except PayloadDecodeError as exc:
            return Failure(ErrorCode.BAD_RESPONSE, f"{listener.name} returned an invalid payload: {exc}")
        return HandlerResponse(payload, outcome.to)
    if outcome.kind == "timeout":
        return Failure(
            ErrorCode.HANDLER_TIMEOUT, f"{listener.name} did not finish within {listener.timeout_seconds:g}s"
        )
    code = ErrorCode.HANDLER_ERROR if outcome.kind == "raised" else ErrorCode.BAD_RESPONSE
    verb = "raised" if outcome.kind == "raised" else ""
    return Failure(code, f"{listener.name} {verb} {outcome.detail}".replace("  ", " "))


def handler_raised(listener: Listener, metadata: HandlerMetadata, exc: Exception) -> Failure:
    log.debug("handler traceback listener=%s thread=%s", listener.name, metadata.thread_id, exc_info=exc)
    return Failure(ErrorCode.HANDLER_ERROR, f"{listener.name} raised {type(exc).__name__}: {exc}")
