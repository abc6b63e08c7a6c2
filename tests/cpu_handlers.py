"""cpu_bound handlers that misbehave on purpose; importable by worker processes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from tests.support import Ping, Pong
from xml_pipeline import HandlerMetadata, HandlerResponse
from xml_pipeline.memory.context_buffer import get_context_buffer


async def whoami(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Pong(str(os.getpid())))


async def explode(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    raise ValueError(f"boom in worker {os.getpid()}")


async def gives_up(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    raise TimeoutError("the upstream service did not answer")


async def spin(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Never awaits, never returns: only a signal can stop it."""
    counter = 0
    while True:
        counter += 1


async def nap(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    await asyncio.sleep(3600)
    return HandlerResponse.respond(Pong("late"))


async def pid_then_nap(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Tells the test which process runs it (in the file named by ``text``), then waits to be killed."""
    Path(payload.text).write_text(str(os.getpid()))  # noqa: ASYNC240 - a few bytes, once
    await asyncio.sleep(3600)
    return HandlerResponse.respond(Pong("survived"))


async def wrong_type(payload: Ping, metadata: HandlerMetadata) -> object:
    return 42


async def writes_history(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Reads the conversation's history in the worker and answers with what it saw."""
    history = get_context_buffer().get_thread(metadata.conversation_id)
    return HandlerResponse.respond(Pong("|".join(f"{slot.from_id}>{slot.to_id}" for slot in history)))


async def busy(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """A quarter of a second of blocking work, well within its listener's timeout."""
    time.sleep(0.25)  # noqa: ASYNC251 - blocking is the point: this stands for CPU work
    return HandlerResponse.respond(Pong(payload.text))
