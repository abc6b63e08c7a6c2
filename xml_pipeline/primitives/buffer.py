"""system.buffer: fan N items out to a target, at most max_in_flight at once, and fan the results in."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from lxml import etree

from xml_pipeline.handler import HandlerMetadata, HandlerResponse
from xml_pipeline.message_bus.buffer_registry import BufferRegistry, BufferState, new_run_id
from xml_pipeline.message_bus.outcome import Failure
from xml_pipeline.primitives.decoding import checked_for, encode
from xml_pipeline.primitives.host import Caller, CallsChecked, PrimitiveHost
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
DETACHED = "system.buffer.detached"
"""The initiator of a ``collect: false`` run stored as a conversation of its own (durable engine)."""


@runtime_checkable
class StoredRuns(Protocol):
    """A host whose conversations live outside any one daemon (the durable engine).

    There a ``collect: false`` run is not kept in the coordinating daemon's
    memory after its caller has been answered: it is stored as a conversation
    of its own, a ``collect: true`` run from :data:`DETACHED`, so a live
    daemon claims it and runs it again if its daemon dies, like any run.
    """

    async def open_internal(self, initiator: str, target_name: str, payload: Any) -> str | Failure: ...


def buffer_handler(pump: PrimitiveHost, registry: BufferRegistry) -> Any:
    async def run_buffer(start: Any, metadata: HandlerMetadata) -> HandlerResponse | None:
        if not isinstance(start, BufferStart):  # return_to's answer on its way back: pass it up
            return HandlerResponse.respond(start)
        problem = _check(pump, start)
        if problem is not None:
            outcome: Any = BufferError(start.buffer_id, problem)
        elif not start.collect and isinstance(pump, StoredRuns):
            label = start.buffer_id or new_run_id()
            run = replace(start, collect=True, buffer_id=label, return_to="")
            stored = await pump.open_internal(DETACHED, "system.buffer", run)
            if isinstance(stored, Failure):
                outcome = BufferError(label, f"the run could not be stored: {stored.detail}")
            else:
                outcome = BufferDispatched(label, len(start.items))
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
                if metadata.from_id == DETACHED:
                    return None  # a run whose caller was told it is dispatched: nobody waits for its outcome
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

    # Each item's outcome as it is recorded. The registry holds the same, for other processes to see; this run
    # is the only one that records them, each index once, so it need not read them back at the end.
    results: list[BufferItem | None] = [None] * state.total_items

    def record(index: int, result: str, error: str = "") -> None:
        registry.store_result(state.buffer_id, index, result, success=not error, error=error or None)
        results[index] = BufferItem(index, not error, result, error)

    async def one(send: Send, index: int) -> None:
        try:
            payload, element = checked_for(target, start.items[index], limits)
        except ValueError as exc:
            record(index, "", f"item is not a valid payload: {exc}")
            return
        answer, text = await send(payload, element)
        if isinstance(answer, FAILURES):
            record(index, "", describe_failure(answer))
        else:
            record(index, text if text is not None else encode(answer))

    async def worker(send: Send) -> None:
        for index in indices:  # shared iterator: each index is taken by exactly one worker
            await one(send, index)

    workers = min(start.max_in_flight, state.total_items)
    try:
        with pump.caller("buffer", state.buffer_id, concurrency=workers) as collector:
            send = _sender(collector, start.target)
            try:
                async with asyncio.timeout(start.timeout_seconds), asyncio.TaskGroup() as group:
                    for _ in itertools.repeat(None, workers):
                        group.create_task(worker(send))
            except TimeoutError:
                timed_out = True
    finally:
        registry.remove(state.buffer_id)
    missing = f"no answer within the buffer's {start.timeout_seconds:g}s deadline"
    items = [item or BufferItem(index, False, "", missing) for index, item in enumerate(results)]
    return BufferComplete(
        buffer_id=label,
        total=state.total_items,
        successful=sum(1 for item in items if item.success),
        results=items,
        timed_out=timed_out,
    )


Send = Callable[[Any, etree._Element], Awaitable[tuple[Any, str | None]]]
"""Sends one item's payload, decoded from the element its target's schema passed, and awaits the answer
(with its XML text, if the caller has it)."""


def _sender(caller: Caller, target: str) -> Send:
    """How items go to ``target``: checked here already, a caller that can take them so checks them no more."""
    if isinstance(caller, CallsChecked):
        return functools.partial(caller.call_checked, target)

    async def send(payload: Any, element: etree._Element) -> tuple[Any, str | None]:
        return await caller.call(target, payload), None

    return send
