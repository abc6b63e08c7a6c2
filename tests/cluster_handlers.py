"""Handlers for the several-daemon tests: each run is written down, so duplicates can be counted."""

from __future__ import annotations

import asyncio
import os

from tests.support import Ping, Pong
from xml_pipeline import HandlerMetadata, HandlerResponse
from xml_pipeline.primitives import BufferComplete, BufferDispatched, BufferStart

RUNS_FILE = "XP_TEST_RUNS_FILE"
"""Environment variable naming the file every handler run appends one line to."""
CURE_FILE = "XP_TEST_CURE_FILE"
"""Environment variable naming a file whose existence stops the poison from killing its daemon."""


def _note_run(payload: Ping, metadata: HandlerMetadata) -> None:
    path = os.environ.get(RUNS_FILE)
    if path:
        line = f"{payload.text} {metadata.delivery_attempt} {os.getpid()}\n".encode()
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, line)  # one short O_APPEND write: whole lines even from many processes
        finally:
            os.close(descriptor)


def _cured() -> bool:
    cure = os.environ.get(CURE_FILE)
    return bool(cure) and os.path.exists(cure)


async def counted_echo(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    _note_run(payload, metadata)
    return HandlerResponse.respond(Pong(payload.text))


async def slow_counted_echo(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    _note_run(payload, metadata)
    await asyncio.sleep(0.5)
    return HandlerResponse.respond(Pong(payload.text))


async def poisoned_echo(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Kills its own daemon on the payload 'poison', as a segfaulting C extension would."""
    _note_run(payload, metadata)
    if payload.text == "poison" and not _cured():
        os._exit(17)
    return HandlerResponse.respond(Pong(payload.text))


async def fan_out(payload: Ping | BufferComplete, metadata: HandlerMetadata) -> HandlerResponse:
    """Ping(text=target, count=N) fans N pings out to ``target`` through system.buffer; answers how it went."""
    if isinstance(payload, Ping):
        items = [f"<Ping><text>item{i}</text></Ping>" for i in range(payload.count)]
        start = BufferStart(target=payload.text, items=items, max_in_flight=200, timeout_seconds=120)
        return HandlerResponse(start, to="system.buffer")
    texts = [item.result for item in payload.results if item.success]
    failures = [item.error for item in payload.results if not item.success]
    summary = f"{payload.successful}/{payload.total} ok; in order: {_in_order(texts)}; failures: {failures[:3]}"
    return HandlerResponse.respond(Pong(summary))


async def dispatch(payload: Ping | BufferDispatched, metadata: HandlerMetadata) -> HandlerResponse:
    """Ping(text=target, count=N) hands N pings to ``target`` through a ``collect: false`` buffer."""
    if isinstance(payload, Ping):
        items = [f"<Ping><text>item{i}</text></Ping>" for i in range(payload.count)]
        start = BufferStart(target=payload.text, items=items, collect=False, max_in_flight=200, timeout_seconds=120)
        return HandlerResponse(start, to="system.buffer")
    return HandlerResponse.respond(Pong(f"dispatched {payload.total}"))


def _in_order(results: list[str]) -> bool:
    return all(f"<text>item{i}</text>" in result for i, result in enumerate(results))
