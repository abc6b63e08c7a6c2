"""system.sequence: run a payload through listeners A -> B -> C."""

from __future__ import annotations

import asyncio
from typing import Any

from xml_pipeline.handler import HandlerMetadata, HandlerResponse
from xml_pipeline.message.system_payloads import Huh, SystemErrorPayload
from xml_pipeline.message_bus.buffer_registry import new_run_id
from xml_pipeline.message_bus.sequence_registry import SequenceRegistry
from xml_pipeline.primitives.collector import NoAnswer
from xml_pipeline.primitives.decoding import decode_for, encode
from xml_pipeline.primitives.host import PrimitiveHost
from xml_pipeline.primitives.payloads import (
    MAX_DEADLINE_SECONDS,
    BufferError,
    SequenceComplete,
    SequenceError,
    SequenceStart,
)

FAILURES = (SystemErrorPayload, Huh, SequenceError, BufferError, NoAnswer)


def describe_failure(answer: Any) -> str:
    if isinstance(answer, SystemErrorPayload):
        return f"{answer.code.value}: {answer.message}"
    if isinstance(answer, Huh):
        return f"did not understand: {answer.message}"
    if isinstance(answer, NoAnswer):
        return "the listener ended without answering"
    return f"{type(answer).__name__}: {answer.error}"


def sequence_handler(pump: PrimitiveHost, registry: SequenceRegistry) -> Any:
    async def run_sequence(start: Any, metadata: HandlerMetadata) -> HandlerResponse:
        if not isinstance(start, SequenceStart):  # return_to's answer on its way back: pass it up
            return HandlerResponse.respond(start)
        outcome = await _run(pump, registry, start, metadata)
        if start.return_to:
            return HandlerResponse(outcome, to=start.return_to)
        return HandlerResponse.respond(outcome)

    return run_sequence


async def _run(
    pump: PrimitiveHost, registry: SequenceRegistry, start: SequenceStart, metadata: HandlerMetadata
) -> SequenceComplete | SequenceError:
    label = start.sequence_id
    if not start.steps:
        return SequenceError(label, "", -1, "a sequence needs at least one step")
    for index, step in enumerate(start.steps):
        if step not in pump.listeners:
            return SequenceError(label, step, index, f"unknown step {step!r}: no listener has that name")
    if start.return_to and start.return_to not in pump.listeners:
        return SequenceError(label, "", -1, f"return_to {start.return_to!r} is no listener")
    if not 0 < start.timeout_seconds <= MAX_DEADLINE_SECONDS:
        return SequenceError(label, "", -1, f"timeout_seconds must be in (0, {MAX_DEADLINE_SECONDS:g}]")
    try:
        payload: Any = decode_for(pump.listeners[start.steps[0]], start.payload, pump.limits.xml_limits())
    except ValueError as exc:
        return SequenceError(label, start.steps[0], 0, f"the payload does not fit the first step: {exc}")
    state = registry.create(
        new_run_id(), list(start.steps), start.return_to, metadata.thread_id, metadata.from_id, start.payload
    )
    label = label or state.sequence_id
    index, step = 0, start.steps[0]
    try:
        with pump.caller("sequence", state.sequence_id, concurrency=1) as collector:
            async with asyncio.timeout(start.timeout_seconds):
                for index, step in enumerate(start.steps):
                    payload = await collector.call(step, payload)
                    if isinstance(payload, FAILURES):
                        return SequenceError(label, step, index, describe_failure(payload))
                    result_xml = encode(payload)
                    registry.advance(state.sequence_id, result_xml)
    except TimeoutError:
        return SequenceError(label, step, index, f"timed out after {start.timeout_seconds:g}s while {step} was running")
    finally:
        registry.remove(state.sequence_id)
    return SequenceComplete(label, result_xml, len(start.steps))
