"""A cpu_bound example: pure-Python number crunching, run in the process pool.

The handler also reports how much of its conversation's history it can see.
On the manager and redis backends that is everything the daemon recorded; on
the memory backend a worker process sees nothing (its state is its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from xml_pipeline import HandlerMetadata, HandlerResponse
from xml_pipeline.memory.context_buffer import get_context_buffer


@dataclass(frozen=True)
class Crunch:
    """Fold ``text`` through ``rounds`` rounds of integer arithmetic."""

    text: str
    rounds: int = 10_000


@dataclass(frozen=True)
class Crunched:
    text: str
    checksum: int
    history_seen: int
    worker_pid: int


def checksum(text: str, rounds: int) -> int:
    """Deliberately plain Python, so it holds the GIL the way real CPU-heavy handlers do."""
    value = 2166136261
    for round_number in range(max(rounds, 0)):
        for char in text:
            value = ((value ^ ord(char)) * 16777619 + round_number) & 0xFFFFFFFF
    return value


async def crunch(payload: Crunch, metadata: HandlerMetadata) -> HandlerResponse:
    history = get_context_buffer().get_thread(metadata.conversation_id)
    result = Crunched(payload.text, checksum(payload.text, payload.rounds), len(history), os.getpid())
    return HandlerResponse.respond(result)
