"""Calling other listeners from a coordinator and awaiting their answers.

Each run of a primitive registers one ephemeral listener,
``system.<kind>.<128-bit random id>``, which accepts any payload. Every call
starts a fresh conversation from that listener to the target; the target's
answer (or the SystemError that climbs back) arrives at the ephemeral listener,
which resolves the waiting call by conversation id. Calls of one run therefore
never share a thread, and calls of different runs never share a listener.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

from lxml import etree

from xml_pipeline.handler import HandlerMetadata
from xml_pipeline.message.system_payloads import SystemErrorPayload
from xml_pipeline.message_bus.invocation import ARRIVED_AS
from xml_pipeline.message_bus.pump import Pump

log = logging.getLogger("xml_pipeline.primitives")


class NoAnswer:
    """What a call returns when the target ended its branch without answering."""

    def __repr__(self) -> str:
        return "NoAnswer"


NO_ANSWER = NoAnswer()


class Collector:
    def __init__(self, pump: Pump, kind: str, run_id: str, *, concurrency: int) -> None:
        self.pump = pump
        self.name = f"system.{kind}.{run_id}"
        self._waiting: dict[str, _Call] = {}
        self._concurrency = concurrency

    def __enter__(self) -> Collector:
        self.pump.register_generic_listener(
            self.name,
            self._receive,
            [SystemErrorPayload],
            peers=[],
            accepts_any=True,
            max_concurrency=max(self._concurrency, 1),
            description="ephemeral collector of answers",
            eager=True,  # _receive never awaits: each answer is taken in the dispatcher's turn, with no task
        )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.pump.unregister_listener(self.name)
        for call in self._waiting.values():
            call.answer.cancel()
        self._waiting.clear()

    async def _receive(self, payload: Any, metadata: HandlerMetadata) -> None:
        call = self._waiting.pop(metadata.conversation_id, None)
        if call is None or call.answer.done():
            log.info("duplicate or late answer ignored by %s (conversation=%s)", self.name, metadata.conversation_id)
            return
        call.text = ARRIVED_AS.get().decode() or None  # eager, so the pump says what XML the answer came as
        call.answer.set_result(payload)

    async def call(self, target: str, payload: Any) -> Any:
        """Send ``payload`` to ``target``; its answer, the SystemErrorPayload, or NO_ANSWER.

        Callers bound the wait with their run's deadline.
        """
        return (await self._call(target, payload, None))[0]

    async def call_checked(self, target: str, payload: Any, element: etree._Element) -> tuple[Any, str | None]:
        """:meth:`call` for ``payload`` decoded from ``element`` after ``target``'s schema passed it; with the
        answer, its XML text as it arrived (None for what did not arrive: NO_ANSWER, a refusal to send)."""
        return await self._call(target, payload, element)

    async def _call(self, target: str, payload: Any, checked: etree._Element | None) -> tuple[Any, str | None]:
        call = _Call(self._waiting)
        failure = await self.pump.start_internal(self.name, target, payload, call.started, call.ended, checked=checked)
        if failure is not None:
            call.forget()
            return SystemErrorPayload(failure.code, failure.detail, failure.code.retry_allowed, target), None
        try:
            return await call.answer, call.text
        finally:
            call.forget()


class _Call:
    """One call of a collector: its conversation, once started, and the answer it waits for."""

    __slots__ = ("answer", "conversation", "text", "waiting")

    def __init__(self, waiting: dict[str, _Call]) -> None:
        self.waiting = waiting
        self.answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.text: str | None = None
        """The answer's XML as it arrived, when it arrived."""
        self.conversation: str | None = None

    def started(self, conversation: str) -> None:
        self.conversation = conversation
        self.waiting[conversation] = self

    def ended(self) -> None:
        if not self.answer.done():
            self.answer.set_result(NO_ANSWER)

    def forget(self) -> None:
        if self.conversation is not None:
            self.waiting.pop(self.conversation, None)
