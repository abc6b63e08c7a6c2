"""Handlers for the several-daemon tests: each run is written down, so duplicates can be counted."""

from __future__ import annotations

import asyncio
import os

from tests.support import Ping, Pong
from xml_pipeline import HandlerMetadata, HandlerResponse

RUNS_FILE = "XP_TEST_RUNS_FILE"
"""Environment variable naming the file every handler run appends one line to."""


def _note_run(payload: Ping, metadata: HandlerMetadata) -> None:
    path = os.environ.get(RUNS_FILE)
    if path:
        line = f"{payload.text} {metadata.delivery_attempt} {os.getpid()}\n".encode()
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, line)  # one short O_APPEND write: whole lines even from many processes
        finally:
            os.close(descriptor)


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
    if payload.text == "poison":
        os._exit(17)
    return HandlerResponse.respond(Pong(payload.text))
