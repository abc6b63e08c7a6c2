"""The example organism: a client greets, the greeting is shouted and decorated.

    console -> greeter -> shouter -> exclaimer
                 ^          ^           |
                 |          +-----------+   (responses prune the chain)
    console <----+

Each payload class is the XML contract of the listener that receives it.
"""

from __future__ import annotations

from dataclasses import dataclass

from xml_pipeline import HandlerMetadata, HandlerResponse


@dataclass(frozen=True)
class Greeting:
    """What a client sends to ``greeter``."""

    name: str
    excitement: int = 1


@dataclass(frozen=True)
class ShoutRequest:
    text: str
    excitement: int = 1


@dataclass(frozen=True)
class Exclaim:
    text: str
    marks: int = 1


@dataclass(frozen=True)
class Exclaimed:
    text: str


@dataclass(frozen=True)
class Shouted:
    text: str


@dataclass(frozen=True)
class GreetingReply:
    """What ``greeter`` answers its caller."""

    text: str


async def greet(payload: Greeting | Shouted, metadata: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, Greeting):
        return HandlerResponse(ShoutRequest(f"hello, {payload.name}", payload.excitement), to="shouter")
    return HandlerResponse.respond(GreetingReply(payload.text))


async def shout(payload: ShoutRequest | Exclaimed, metadata: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, ShoutRequest):
        return HandlerResponse(Exclaim(payload.text.upper(), payload.excitement), to="exclaimer")
    return HandlerResponse.respond(Shouted(payload.text))


async def exclaim(payload: Exclaim, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Exclaimed(payload.text + "!" * max(payload.marks, 0)))
