"""What the orchestration primitives need from the engine that runs them, and nothing more.

Both engines host them: the in-process pump (calls are conversations it
starts, answers come back to an ephemeral listener) and the durable engine
(calls are conversations stored in Redis, answers are read from their reply
streams, so the work can be done by any daemon).
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from lxml import etree

from xml_pipeline.handler import Handler
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.organism import Listener, PumpLimits


class Caller(Protocol):
    async def call(self, target: str, payload: Any) -> Any:
        """Send ``payload`` to ``target`` in a conversation of its own; its answer, the
        SystemErrorPayload that came back instead, or NO_ANSWER. Callers bound the wait."""
        ...


@runtime_checkable
class CallsChecked(Protocol):
    """A caller that can also send a payload already checked, so that it is not checked twice.

    ``system.buffer`` decodes each item from its text and checks it against
    the target's schema to tell a bad item from a failed call; the in-process
    pump's caller then takes that element as the payload's XML, held to the
    limits, instead of writing, validating and decoding the payload again.
    """

    async def call_checked(self, target: str, payload: Any, element: etree._Element) -> tuple[Any, str | None]:
        """:meth:`Caller.call` for ``payload`` decoded from ``element``, which ``target``'s schema passed;
        with the answer, its XML text as it arrived (None if the caller has none, e.g. for NO_ANSWER)."""
        ...


class PrimitiveHost(Protocol):
    limits: PumpLimits
    buffer: ContextBuffer

    @property
    def listeners(self) -> Mapping[str, Listener]: ...

    def register_generic_listener(
        self,
        name: str,
        handler: Handler,
        payload_classes: Iterable[type],
        *,
        peers: Iterable[str] | None = None,
        timeout_seconds: float = 30.0,
        max_concurrency: int = 16,
        description: str = "",
        accepts_any: bool = False,
        coordinator: bool = False,
    ) -> Listener: ...

    def run_background(self, work: Coroutine[Any, Any, object], name: str) -> None: ...

    def caller(self, kind: str, run_id: str, *, concurrency: int) -> AbstractContextManager[Caller]:
        """A caller for one run of a primitive; leaving it forgets the run's waiting calls."""
        ...
