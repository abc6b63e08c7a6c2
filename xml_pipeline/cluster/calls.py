"""Calls the primitives make on the durable engine: each a conversation stored in Redis.

A run of ``system.buffer`` or ``system.sequence`` calls its target by opening a
conversation whose initiator is the run's own name (``system.buffer.<id>``).
Any daemon may handle the call; the answer, or the SystemError that climbed
back, lands in the conversation's reply stream, which the coordinating daemon
reads. So the items of a buffer spread over every daemon serving the target,
and a daemon that dies mid-item loses nothing: its hop is handled again by
another, and the answer still reaches the coordinator.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from xml_pipeline.imports import import_object
from xml_pipeline.message.payload_codec import PayloadDecodeError, codec_for
from xml_pipeline.message.safe_xml import XmlRejected
from xml_pipeline.message.system_payloads import ErrorCode, SystemErrorPayload
from xml_pipeline.message_bus.outcome import Failure
from xml_pipeline.primitives.collector import NO_ANSWER

if TYPE_CHECKING:
    from xml_pipeline.cluster.engine import DurableEngine

log = logging.getLogger("xml_pipeline.primitives")

WAIT_SLICE_SECONDS = 60.0
"""How long one wait for an answer lasts before it is renewed; the run's own deadline bounds the total."""


class DurableCaller:
    def __init__(self, engine: DurableEngine, kind: str, run_id: str) -> None:
        self.engine = engine
        self.name = f"system.{kind}.{run_id}"

    def __enter__(self) -> DurableCaller:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """Calls still waiting are abandoned with the run: their answers expire with their reply streams."""

    async def call(self, target: str, payload: Any) -> Any:
        opened = await self.engine.open_internal(self.name, target, payload)
        if isinstance(opened, Failure):
            return SystemErrorPayload(opened.code, opened.detail, opened.code.retry_allowed, target)
        while True:
            try:
                collected = await self.engine.collect(opened, "end", WAIT_SLICE_SECONDS)
            except (RedisError, OSError) as exc:
                failure = Failure(ErrorCode.BACKEND_UNAVAILABLE, f"the answer could not be read: {exc}")
                return SystemErrorPayload(failure.code, failure.detail, True, target)
            if collected is None:
                return NO_ANSWER
            if collected.ended or collected.replies:
                break
        if not collected.replies:
            return NO_ANSWER
        answer = collected.replies[0]
        try:
            return codec_for(import_object(answer.payload_type)).from_bytes(answer.payload_xml)
        except (XmlRejected, PayloadDecodeError, ImportError, AttributeError) as exc:
            log.warning("an answer to %s could not be decoded: %s", self.name, exc)
            return SystemErrorPayload(ErrorCode.BAD_RESPONSE, f"undecodable answer: {exc}", False, target)
