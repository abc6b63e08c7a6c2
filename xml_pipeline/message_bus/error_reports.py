"""Every SystemError's log line and count, and the errors that go straight into a client's mailbox.

Which listener an error goes to is routing's business (:mod:`.routing`);
this module is what every error gets wherever it goes, and the direct line to
the client for errors that have nowhere else to go or no time to get there
(shutdown, a bug in the pump).
"""

from __future__ import annotations

import logging

from lxml import etree

from xml_pipeline.message.envelope import envelope_bytes
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message.system_payloads import ErrorCode, SystemErrorPayload
from xml_pipeline.message_bus.conversations import Conversation, Reply
from xml_pipeline.message_bus.instruments import Instruments
from xml_pipeline.message_bus.outcome import Failure, error_payload

log = logging.getLogger("xml_pipeline.pump")

SYSTEM_SENDER = "system"


class ErrorReports:
    def __init__(self, instruments: Instruments) -> None:
        self._instruments = instruments

    def note(
        self,
        code: ErrorCode,
        detail: str,
        *,
        listener: str | None,
        thread: str,
        sender: str | None,
        conversation: str,
    ) -> None:
        """The one log line and the one count that every SystemError gets.

        ``conversation`` is the thread the client sees (its replies and errors
        arrive on it), so an operator can search the log for what a client
        reports; ``thread`` is the hop's own thread.
        """
        self._instruments.metrics.error(code)
        self._instruments.observe.error(conversation, code, detail, listener)
        log.warning(
            "message failed code=%s listener=%s conversation=%s thread=%s from=%s: %s",
            code.value,
            listener or "-",
            conversation,
            thread,
            sender or "-",
            detail,
        )

    def to_client(self, conversation: Conversation, code: ErrorCode, detail: str, listener: str) -> None:
        """Straight into the client's mailbox; never awaits, so it works while cancelling."""
        self.note(code, detail, listener=listener, thread=conversation.id, sender=None, conversation=conversation.id)
        if conversation.submission is None:
            return  # started by a listener: the log line is all there is to tell
        reply = error_reply(code, detail, to=conversation.initiator, thread=conversation.id, listener=listener)
        conversation.submission.deliver(reply)


def error_reply(code: ErrorCode, detail: str, *, to: str | None, thread: str, listener: str = "") -> Reply:
    """The SystemError a client reads, as a reply from ``system``."""
    payload = error_payload(Failure(code, detail), listener)
    element = codec_for(SystemErrorPayload).to_element(payload)
    envelope = envelope_bytes(SYSTEM_SENDER, to, thread, etree.tostring(element))
    return Reply(sender=SYSTEM_SENDER, to=to or "", thread=thread, payload=payload, envelope=envelope)
