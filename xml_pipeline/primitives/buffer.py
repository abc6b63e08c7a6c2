"""system.buffer: fan N items out to a target, at most max_in_flight at once, and fan the results in."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

from xml_pipeline.handler import HandlerMetadata, HandlerResponse
from xml_pipeline.message_bus.buffer_registry import BufferItemResult, BufferRegistry, BufferState, new_run_id
from xml_pipeline.primitives.decoding import decode_for, encode
from xml_pipeline.primitives.host import Caller, PrimitiveHost
from xml_pipeline.primitives.payloads import (
    MAX_DEADLINE_SECONDS,
    BufferComplete,
    BufferDispatched,
    BufferError,
    BufferItem,
    BufferStart,
)
from xml_pipeline.primitives.sequence import FAILURES, describe_failure

MAX_IN_FLIGHT_CEILING = 10_000


def buffer_handler(pump: PrimitiveHost, registry: BufferRegistry) -> Any:
    async def run_buffer(start: Any, metadata: HandlerMetadata) -> HandlerResponse:
        if not isinstance(start, BufferStart):  # return_to's answer on its way back: pass it up
            return HandlerResponse.respond(start)
        problem = _check(pump, start)
        if problem is not None:
            outcome: Any = BufferError(start.buffer_id, problem)
        else:
            state = registry.create(
                buffer_id=new_run_id(),
                total_items=len(start.items),
                return_to=start.return_to,
                thread_id=metadata.thread_id,
                from_id=metadata.from_id,
                target=start.target,
                collect=start.collect,
            )
            label = start.buffer_id or state.buffer_id
            if start.collect:
                outcome = await _fan_out_and_in(pump, registry, state, start, label)
            else:
                pump.run_background(
                    _fan_out_and_in(pump, registry, state, start, label), name=f"buffer {state.buffer_id}"
                )
                outcome = BufferDispatched(label, state.total_items)
        if start.return_to:
            return HandlerResponse(outcome, to=start.return_to)
        return HandlerResponse.respond(outcome)

    return run_buffer


def _check(pump: PrimitiveHost, start: BufferStart) -> str | None:
    if not start.items:
        return "a buffer needs at least one item"
    if start.target not in pump.listeners:
        return f"unknown target {start.target!r}: no listener has that name"
    if start.return_to and start.return_to not in pump.listeners:
        return f"return_to {start.return_to!r} is no listener"
    if not 1 <= start.max_in_flight <= MAX_IN_FLIGHT_CEILING:
        return f"max_in_flight must be between 1 and {MAX_IN_FLIGHT_CEILING}"
    if not 0 < start.timeout_seconds <= MAX_DEADLINE_SECONDS:
        return f"timeout_seconds must be in (0, {MAX_DEADLINE_SECONDS:g}]"
    return None


async def _fan_out_and_in(
    pump: PrimitiveHost, registry: BufferRegistry, state: BufferState, start: BufferStart, label: str
) -> BufferComplete:
    target = pump.listeners[start.target]
    limits = pump.limits.xml_limits()
    indices: Iterator[int] = iter(range(state.total_items))
    timed_out = False

    async def one(collector: Caller, index: int) -> None:
        try:
            payload = decode_for(target, start.items[index], limits)
        except ValueError as exc:
            registry.store_result(
                state.buffer_id, index, "", success=False, error=f"item is not a valid payload: {exc}"
            )
            return
        answer = await collector.call(start.target, payload)
        if isinstance(answer, FAILURES):
            registry.store_result(state.buffer_id, index, "", success=False, error=describe_failure(answer))
        else:
            registry.store_result(state.buffer_id, index, encode(answer))

    async def worker(collector: Caller) -> None:
        for index in indices:  # shared iterator: each index is taken by exactly one worker
            await one(collector, index)

    workers = min(start.max_in_flight, state.total_items)
    try:
        with pump.caller("buffer", state.buffer_id, concurrency=workers) as collector:
            try:
                async with asyncio.timeout(start.timeout_seconds), asyncio.TaskGroup() as group:
                    for _ in itertools.repeat(None, workers):
                        group.create_task(worker(collector))
            except TimeoutError:
                timed_out = True
        final = registry.get(state.buffer_id)
    finally:
        registry.remove(state.buffer_id)
    results = final.results if final is not None else {}
    items = [results.get(index) or _missing(index, start.timeout_seconds) for index in range(state.total_items)]
    return BufferComplete(
        buffer_id=label,
        total=state.total_items,
        successful=sum(1 for item in items if item.success),
        results=[BufferItem(item.index, item.success, item.result, item.error or "") for item in items],
        timed_out=timed_out,
    )


def _missing(index: int, timeout: float) -> BufferItemResult:
    return BufferItemResult(index, "", success=False, error=f"no answer within the buffer's {timeout:g}s deadline")
