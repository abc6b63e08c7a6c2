"""Listeners that misbehave on purpose, and helpers to build organisms in tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from xml_pipeline import Handler, HandlerMetadata, HandlerResponse, SystemErrorPayload
from xml_pipeline.message.envelope import ENVELOPE_NS
from xml_pipeline.organism import Listener, Organism, PumpLimits

THREAD = "3f2a9c1e-0b7d-4e7a-9a51-6d2b8f1c0e42"


@dataclass(frozen=True)
class Ping:
    text: str
    count: int = 1


@dataclass(frozen=True)
class Pong:
    text: str


@dataclass
class Bag:
    items: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Unrelated:
    value: int


async def echo(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Pong(payload.text))


async def bloated(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Answers with as many bytes as the ping's count asks for (in-process or in a worker)."""
    return HandlerResponse.respond(Pong("x" * payload.count))


async def raises(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    raise RuntimeError(f"cannot handle {payload.text}")


async def hangs(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def wrong_type(payload: Ping, metadata: HandlerMetadata) -> object:
    return "a plain string"


async def wrong_payload_for_caller(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    return HandlerResponse.respond(Unrelated(1))


def forwarder(target: str) -> Handler:
    """A handler that forwards a Ping to ``target`` and responds with whatever comes back."""

    async def forward(payload: Ping | Pong, metadata: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Ping):
            return HandlerResponse(payload, to=target)
        return HandlerResponse.respond(payload)

    return forward


async def forwards_to_raiser(payload: Ping | Pong | SystemErrorPayload, metadata: HandlerMetadata) -> HandlerResponse:
    if isinstance(payload, SystemErrorPayload):
        return HandlerResponse.respond(Pong(f"recovered from {payload.code.value}"))
    if isinstance(payload, Ping):
        return HandlerResponse(payload, to="raiser")
    return HandlerResponse.respond(payload)


def envelope(payload_xml: str, *, sender: str = "console", to: str = "echo", thread: str = THREAD) -> bytes:
    return (
        f'<message xmlns="{ENVELOPE_NS}"><meta><from>{sender}</from><to>{to}</to>'
        f"<thread>{thread}</thread></meta>{payload_xml}</message>"
    ).encode()


def ping_xml(text: str = "hi") -> str:
    return f'<Ping xmlns=""><text>{text}</text><count>1</count></Ping>'


def misbehaving_organism(limits: PumpLimits | None = None) -> Organism:
    return Organism.of(
        "zoo",
        [
            Listener("echo", [Ping], echo, peers=[]),
            Listener("raiser", [Ping], raises),
            Listener("hanger", [Ping], hangs, timeout_seconds=0.2),
            Listener("liar", [Ping], wrong_type),
            Listener("stranger", [Ping], wrong_payload_for_caller),
            Listener("relay", [Ping, Pong], forwarder("echo"), peers=["echo"]),
            Listener("mute", [Ping, Pong], forwarder("echo"), peers=[]),
            Listener("lost", [Ping], forwarder("ghost")),
            Listener("asker", [Ping, Pong], forwarder("stranger")),
            Listener("guardian", [Ping, Pong, SystemErrorPayload], forwards_to_raiser, peers=["raiser"]),
            Listener("team.alpha", [Ping, Pong], forwarder("system.echo"), peers=["system.echo"]),
        ],
        limits,
    )


async def slow_echo(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
    """Answers after half a second: long enough to be in flight when a test stops the daemon."""
    await asyncio.sleep(0.5)
    return HandlerResponse.respond(Pong(payload.text))
