"""Listeners for the orchestration tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from xml_pipeline import HandlerMetadata, HandlerResponse, Huh


@dataclass(frozen=True)
class Count:
    value: int
    delay: float = 0.0


@dataclass(frozen=True)
class Ack:
    what: str


async def add_one(payload: Count, metadata: HandlerMetadata) -> HandlerResponse:
    if payload.delay:
        await asyncio.sleep(payload.delay)
    return HandlerResponse.respond(Count(payload.value + 1))


async def double(payload: Count, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Count(payload.value * 2))


async def fail_on_sevens(payload: Count, metadata: HandlerMetadata) -> HandlerResponse:
    if payload.value % 7 == 0:
        raise ValueError(f"{payload.value} is a multiple of seven")
    return HandlerResponse.respond(Count(payload.value + 1))


async def puzzled(payload: Count, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Huh("no idea what to do with that", str(payload.value)))
