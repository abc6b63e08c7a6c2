"""Test your listeners the way xml-pipeline tests its own: a real pump, in-process.

async with running(organism) as pump:
    reply = await ask(pump, Greeting("Ada"), to="greeter")
    assert reply.payload == GreetingReply("HELLO, ADA!")
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message_bus.conversations import Reply
from xml_pipeline.message_bus.pump import ConversationEndHook, Pump
from xml_pipeline.organism import Organism


@contextlib.asynccontextmanager
async def running(
    organism: Organism,
    *,
    backend: SharedBackend | None = None,
    on_conversation_end: ConversationEndHook | None = None,
) -> AsyncIterator[Pump]:
    """A started pump for ``organism`` (on ``backend``, in memory by default), drained and stopped on exit."""
    pump = Pump(organism, backend=backend, on_conversation_end=on_conversation_end)
    await pump.start()
    try:
        yield pump
    finally:
        await pump.stop(drain_timeout=5.0)


async def ask(pump: Pump, payload: Any, to: str, *, sender: str = "console", timeout: float = 10.0) -> Reply:
    """Send ``payload`` to listener ``to`` as client ``sender``; return the first reply."""
    submission = await pump.inject_payload(payload, to, sender=sender)
    return await submission.next_reply(timeout)
