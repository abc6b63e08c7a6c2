"""The handler contract, whole: ``async def handler(payload, metadata) -> HandlerResponse | None``.

Everything else in xml-pipeline composes around these few types.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class HandlerMetadata:
    """What a handler may know about the message it is handling.

    ``thread_id`` is opaque: pass it around, never parse it. ``conversation_id``
    keys the conversation's history in the context buffer.
    """

    thread_id: str
    from_id: str
    own_name: str
    conversation_id: str
    is_self_call: bool = False
    delivery_attempt: int = 1
    """1 the first time this message reaches a handler. With ``delivery: at-least-once`` a message
    whose daemon died before finishing it is handled again (2, 3, ...): handlers whose effects must
    happen once use it, with the thread, to recognise a repeat."""


@dataclass(frozen=True, slots=True)
class HandlerResponse:
    """What a handler sends on: ``to`` a listener (forward) or, with ``to=None``, its caller."""

    payload: Any
    to: str | None = None

    @classmethod
    def respond(cls, payload: Any) -> HandlerResponse:
        """Reply to whoever called this listener on this thread."""
        return cls(payload=payload, to=None)

    @property
    def is_response(self) -> bool:
        return self.to is None


Handler = Callable[[Any, HandlerMetadata], Awaitable["HandlerResponse | None"]]
