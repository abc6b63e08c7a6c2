"""Pipeline step 8 for the pump: what a handler's result becomes, and where errors go.

The rules are the durable engine's (:mod:`xml_pipeline.cluster.routing`; the
README's Errors section):

- ``HandlerResponse(payload, to=name)`` forwards: ``name`` must be a listener
  the handler may call, and the payload must meet its contract; the chain
  grows by one segment.
- ``HandlerResponse.respond(payload)`` prunes the chain: the caller (a
  listener, or the client at the root) gets the payload on its own thread.
- ``None`` ends this branch.
- A handler's failure goes to its caller if the caller accepts
  ``SystemErrorPayload``, otherwise it climbs the chain to the nearest caller
  that does, ending at the client. A failure of the output itself (an unknown
  target, a payload the target refuses) goes to the handler's own listener if
  it accepts errors, and otherwise climbs the same way.

Unlike the durable router this one acts at once: each message is recorded and
queued (:mod:`.dispatch`), each reply put in its client's mailbox.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from xml_pipeline.handler import HandlerResponse
from xml_pipeline.memory.state_ops import RegisterThread
from xml_pipeline.message.envelope import envelope_bytes
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.call_chains import CallChains
from xml_pipeline.message_bus.conversations import Conversation, Reply
from xml_pipeline.message_bus.dispatch import Delivery
from xml_pipeline.message_bus.error_reports import SYSTEM_SENDER, ErrorReports
from xml_pipeline.message_bus.instruments import Instruments
from xml_pipeline.message_bus.outcome import Failure, error_payload
from xml_pipeline.message_bus.outputs import OutputPreparer
from xml_pipeline.message_bus.recording import Recorder
from xml_pipeline.organism import Listener

log = logging.getLogger("xml_pipeline.pump")

Enqueue = Callable[[Conversation, Delivery], Awaitable[Failure | None]]
"""Queue a message for its handler, waiting for room (bounded); the failure if there is none."""


class Router:
    def __init__(
        self,
        listeners: Callable[[], Mapping[str, Listener]],
        outputs: OutputPreparer,
        chains: CallChains,
        recorder: Recorder,
        reports: ErrorReports,
        instruments: Instruments,
        enqueue: Enqueue,
    ) -> None:
        self._listeners = listeners
        self._outputs = outputs
        self._chains = chains
        self._recorder = recorder
        self._reports = reports
        self._instruments = instruments
        self._enqueue = enqueue

    # ------------------------------------------------------------------ results
    async def route(self, delivery: Delivery, result: Any) -> None:
        """Send what ``delivery``'s handler returned where it asked; report what cannot go."""
        if result is None:
            return
        name = delivery.listener.name
        failure = await self._deliver_result(delivery, result)
        if failure is None:
            self._instruments.metrics.message_out(name)
        else:
            await self._report_output_error(delivery.conversation, delivery.thread, failure, name)

    async def _deliver_result(self, delivery: Delivery, result: Any) -> Failure | None:
        """Send what a handler returned where it asked; the failure if it cannot go."""
        listener, conversation = delivery.listener, delivery.conversation
        if not isinstance(result, HandlerResponse):
            kind = type(result).__name__
            return Failure(
                ErrorCode.BAD_RESPONSE, f"{listener.name} returned {kind}; a handler returns HandlerResponse or None"
            )
        listeners = self._listeners()
        if result.to is not None:
            target = listeners.get(result.to)
            if target is None:
                return Failure(ErrorCode.UNKNOWN_TARGET, f"{listener.name} sent to {result.to!r}, which is no listener")
            if not listener.may_call(result.to):
                return Failure(ErrorCode.PEER_NOT_ALLOWED, f"{listener.name} may not send to {result.to!r}")
            return await self.send(conversation, target, result.payload, listener.name, None, delivery.thread)
        pruned = self._chains.caller_of(delivery.thread)
        if pruned is None:
            log.warning(
                "response dropped: %s is the root of thread=%s and has no caller", listener.name, delivery.thread
            )
            return None
        caller = listeners.get(pruned.target)
        if caller is not None:
            return await self.send(
                conversation, caller, result.payload, listener.name, pruned.thread_id, delivery.thread
            )
        if pruned.target == conversation.initiator:
            return await self._to_client(conversation, listener.name, pruned.target, pruned.thread_id, result.payload)
        return Failure(ErrorCode.UNKNOWN_TARGET, f"{listener.name}'s caller {pruned.target!r} is no longer a listener")

    async def send(
        self,
        conversation: Conversation,
        target: Listener,
        payload: Any,
        sender: str,
        thread: str | None,
        from_thread: str,
    ) -> Failure | None:
        """Queue a message from a listener (or the system) to ``target``.

        ``thread`` is the delivery thread for a response; ``None`` means a
        forward, whose thread extends ``from_thread`` once the payload is valid.
        """
        prepared = self._outputs.for_listener(target, payload, sender)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        registrations: list[RegisterThread] = []
        if thread is None:
            thread, registrations = self._chains.extend(from_thread, target.name)
        recorder, to = self._recorder, target.name
        if recorder.immediate:
            failure = recorder.record_now(conversation, sender, to, thread, fresh, payload_xml, registrations)
        else:
            failure = await recorder.record(conversation, sender, to, thread, fresh, payload_xml, registrations)
        if failure is not None:
            return failure
        return await self._enqueue(conversation, Delivery(target, fresh, payload_xml, sender, thread, conversation))

    async def _to_client(
        self, conversation: Conversation, sender: str, to: str, thread: str, payload: Any
    ) -> Failure | None:
        """Deliver a message addressed to the conversation's client into its mailbox."""
        prepared = self._outputs.for_client(payload, sender, to)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        recorder = self._recorder
        if recorder.immediate:
            failure = recorder.record_now(conversation, sender, to, thread, fresh, payload_xml)
        else:
            failure = await recorder.record(conversation, sender, to, thread, fresh, payload_xml)
        self._instruments.observe.hop(conversation.id, sender, to, thread, type(fresh), payload_xml)
        if failure is not None:
            log.warning("reply delivered unrecorded listener=%s thread=%s: %s", sender, thread, failure.detail)
        if conversation.submission is None:  # a listener started it and is gone (e.g. a finished buffer)
            log.info("late answer dropped: %s is no longer listening (thread=%s from=%s)", to, thread, sender)
            return None
        envelope = envelope_bytes(sender, to, thread, payload_xml)
        conversation.submission.deliver(Reply(sender=sender, to=to, thread=thread, payload=fresh, envelope=envelope))
        return None

    # ------------------------------------------------------------------ errors
    async def failed(self, delivery: Delivery, failure: Failure) -> None:
        """``delivery``'s handler did not finish well: its caller hears, or the nearest one that can."""
        name = delivery.listener.name
        self._reports.note(
            failure.code,
            failure.detail,
            listener=name,
            thread=delivery.thread,
            sender=delivery.sender,
            conversation=delivery.conversation.id,
        )
        await self._climb(delivery.conversation, delivery.thread, failure, name)

    async def _report_output_error(
        self, conversation: Conversation, thread: str, failure: Failure, listener: str
    ) -> None:
        """``listener`` (at the head of ``thread``'s chain) produced output that cannot go where it asked."""
        self._reports.note(
            failure.code,
            failure.detail,
            listener=listener,
            thread=thread,
            sender=listener,
            conversation=conversation.id,
        )
        head = self._listeners().get(listener)
        if head is not None and head.accepts_errors:
            await self._error_to_listener(conversation, head, thread, failure, listener)
        else:
            await self._climb(conversation, thread, failure, listener)

    async def _climb(self, conversation: Conversation, thread: str, failure: Failure, listener: str) -> None:
        """Carry an error up ``thread``'s call chain to the nearest caller that can take it."""
        current = thread
        while (pruned := self._chains.caller_of(current)) is not None:
            caller = self._listeners().get(pruned.target)
            if caller is not None and caller.accepts_errors:
                await self._error_to_listener(conversation, caller, pruned.thread_id, failure, listener)
                return
            if caller is None and pruned.target == conversation.initiator:
                await self._to_client(
                    conversation, SYSTEM_SENDER, pruned.target, pruned.thread_id, error_payload(failure, listener)
                )
                return
            current = pruned.thread_id
        log.error(
            "error had no caller to go to code=%s listener=%s conversation=%s thread=%s",
            failure.code.value,
            listener,
            conversation.id,
            thread,
        )

    async def _error_to_listener(
        self, conversation: Conversation, target: Listener, thread: str, failure: Failure, listener: str
    ) -> None:
        error = error_payload(failure, listener)
        problem = await self.send(conversation, target, error, SYSTEM_SENDER, thread, thread)
        if problem is not None:  # the error itself could not be delivered: tell the client instead
            detail = f"{failure.detail} (and it could not reach {target.name}: {problem.detail})"
            self._reports.to_client(conversation, failure.code, detail, listener)
