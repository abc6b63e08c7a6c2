"""Conversation lifecycle: which conversations are live, and what ending one involves.

Every message of a conversation is counted from the moment it is about to be
queued until its handler is done (:meth:`Lifecycle.begin_one`,
:meth:`Lifecycle.finish_one`). A handler's output is counted before its input
is let go, so the count cannot touch zero mid-flight; when it does, nothing of
the conversation is queued or running, and it ends: its threads and history
are deleted, then its client and its starter hear that it is over. The total
over all conversations tells a draining pump when it is idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from xml_pipeline.memory.context_buffer import BufferSlot, ContextBuffer
from xml_pipeline.memory.state_batcher import StateBatcher
from xml_pipeline.memory.state_ops import DeleteHistory, ForgetThread, RegisterThread, StateOp
from xml_pipeline.message_bus.call_chains import CallChains
from xml_pipeline.message_bus.conversations import Conversation
from xml_pipeline.message_bus.instruments import Instruments

log = logging.getLogger("xml_pipeline.pump")

ConversationEndHook = Callable[[str, tuple[BufferSlot, ...]], None]
"""Told of each conversation that ends, with its history, before the history is deleted."""


class Lifecycle:
    def __init__(
        self,
        chains: CallChains,
        buffer: ContextBuffer,
        state: StateBatcher,
        instruments: Instruments,
        *,
        max_conversations: int,
        on_conversation_end: ConversationEndHook | None = None,
    ) -> None:
        self._chains = chains
        self._buffer = buffer
        self._state = state
        self._instruments = instruments
        self._max_conversations = max_conversations
        self._on_conversation_end = on_conversation_end
        self.live: dict[str, Conversation] = {}
        self.pending_total = 0
        """Messages queued or being handled, over every conversation."""
        self.idle: asyncio.Event | None = None
        """Set whenever nothing is pending; made when the pump starts."""

    @property
    def full(self) -> bool:
        """No conversation may start now."""
        return len(self.live) >= self._max_conversations

    def open(self, conversation: Conversation, target: str) -> tuple[str, list[RegisterThread]]:
        """Make ``conversation`` live: its root thread, the thread its target is called on, and their writes."""
        self.live[conversation.id] = conversation
        return self._chains.open(conversation, target)

    def begin_one(self, conversation: Conversation) -> None:
        """Count a message that is about to be queued; paired with :meth:`finish_one`."""
        conversation.pending += 1
        self.pending_total += 1
        if self.idle is not None:
            self.idle.clear()

    def finish_one(self, conversation: Conversation) -> None:
        conversation.pending -= 1
        self.pending_total -= 1
        if conversation.pending == 0:
            self._end(conversation)
        if self.pending_total == 0 and self.idle is not None:
            self.idle.set()

    def _end(self, conversation: Conversation) -> None:
        """Nothing of the conversation is queued or running: forget its threads and history."""
        self._instruments.observe.ended(conversation.id)
        if self._on_conversation_end is not None:
            try:
                self._on_conversation_end(conversation.id, self._buffer.get_thread(conversation.id))
            except Exception:
                log.exception("on_conversation_end hook failed conversation=%s", conversation.id)
        ops: list[StateOp] = list(map(ForgetThread, conversation.chains.values()))
        ops.append(DeleteHistory(conversation.id))
        self._chains.forget(conversation)
        self.live.pop(conversation.id, None)
        self._state.run_later(ops, then=lambda: _ended(conversation))


def _ended(conversation: Conversation) -> None:
    """The conversation's state is gone: now its client and its starter may hear that it is over."""
    if conversation.submission is not None:
        conversation.submission.close()
    if conversation.on_end is not None:
        try:
            conversation.on_end()
        except Exception:
            log.exception("on_end hook failed conversation=%s", conversation.id)
