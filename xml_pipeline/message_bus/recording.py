"""Each hop written to its conversation's history, with any thread it opens, in one batched call.

A write the store refuses becomes the Failure its sender hears: a full
history, too many conversations, or a store that cannot be reached. Threads
whose registration failed are forgotten again, so that a retry registers them.
"""

from __future__ import annotations

from typing import Any

from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.shared_backend import BackendUnavailable, BufferFull, TooManyThreads
from xml_pipeline.memory.state_batcher import StateBatcher
from xml_pipeline.memory.state_ops import RegisterThread, StateOp
from xml_pipeline.message.payload_codec import payload_type_name
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.call_chains import CallChains
from xml_pipeline.message_bus.conversations import Conversation
from xml_pipeline.message_bus.outcome import Failure


class Recorder:
    def __init__(
        self, buffer: ContextBuffer, state: StateBatcher, chains: CallChains, *, max_slots_per_thread: int
    ) -> None:
        self._buffer = buffer
        self._state = state
        self._chains = chains
        self._max_slots_per_thread = max_slots_per_thread
        self._type_names: dict[type, str] = {}

    async def record(
        self,
        conversation: Conversation,
        sender: str,
        to: str,
        thread: str,
        payload: Any,
        payload_xml: bytes,
        registrations: list[RegisterThread] | None = None,
    ) -> Failure | None:
        """Write the hop to history (and any new thread to the registry): one batched call."""
        state = self._state
        if state.immediate:
            return self.record_now(conversation, sender, to, thread, payload, payload_xml, registrations)
        ops = self._ops(conversation, sender, to, thread, payload, payload_xml, registrations)
        try:
            outcomes = await state.run(ops)
        except BackendUnavailable as exc:
            return self._unavailable(exc, registrations)
        return self._judged(ops, outcomes)

    def record_now(
        self,
        conversation: Conversation,
        sender: str,
        to: str,
        thread: str,
        payload: Any,
        payload_xml: bytes,
        registrations: list[RegisterThread] | None = None,
    ) -> Failure | None:
        """:meth:`record` when the store is not shared (:attr:`immediate`): the same write, made at once,
        without a coroutine (what the in-process hot path calls, twice per round trip)."""
        ops = self._ops(conversation, sender, to, thread, payload, payload_xml, registrations)
        try:
            outcomes = self._state.backend.apply(ops)
        except BackendUnavailable as exc:
            return self._unavailable(exc, registrations)
        return self._judged(ops, outcomes)

    @property
    def immediate(self) -> bool:
        """Writes are made at once (:meth:`record_now` may be called instead of awaiting :meth:`record`)."""
        return self._state.immediate

    def _ops(
        self,
        conversation: Conversation,
        sender: str,
        to: str,
        thread: str,
        payload: Any,
        payload_xml: bytes,
        registrations: list[RegisterThread] | None,
    ) -> list[StateOp]:
        cls = type(payload)
        type_name = self._type_names.get(cls)
        if type_name is None:
            type_name = self._type_names[cls] = payload_type_name(cls)
        append = self._buffer.append_op(
            conversation.id,
            from_id=sender,
            to_id=to,
            hop_thread=thread,
            payload_type=type_name,
            payload_xml=payload_xml,
        )
        return [*registrations, append] if registrations else [append]

    def _unavailable(self, exc: BackendUnavailable, registrations: list[RegisterThread] | None) -> Failure:
        self._chains.unclaim(op.uuid for op in registrations or ())
        return Failure(ErrorCode.BACKEND_UNAVAILABLE, str(exc))

    def _judged(self, ops: list[StateOp], outcomes: list[object]) -> Failure | None:
        """None if every write was made; else the Failure of the first refused, its threads forgotten again."""
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                break
        else:
            return None
        self._chains.unclaim(
            op.uuid
            for op, outcome in zip(ops, outcomes, strict=True)
            if isinstance(op, RegisterThread) and isinstance(outcome, Exception)
        )
        return self._refused_write(outcome)

    def _refused_write(self, refused: Exception) -> Failure:
        if isinstance(refused, BufferFull):
            limit = self._max_slots_per_thread
            return Failure(ErrorCode.HISTORY_FULL, f"the conversation reached its limit of {limit} messages")
        if isinstance(refused, TooManyThreads):
            return Failure(ErrorCode.OVERLOAD, "too many conversations are open; try again later")
        return Failure(ErrorCode.BACKEND_UNAVAILABLE, str(refused))
