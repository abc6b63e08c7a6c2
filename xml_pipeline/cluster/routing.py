"""Pipeline step 8 for the durable engine: what a handler's result becomes, without touching Redis.

The rules are the in-process pump's (see the README's Errors section):

- ``HandlerResponse(payload, to=name)`` forwards: ``name`` must be a listener
  the handler may call, and the payload must meet its contract; the chain
  grows by one segment with a fresh thread.
- ``HandlerResponse.respond(payload)`` prunes the chain: the caller (a
  listener, or the client at the root) gets the payload on its own thread.
- ``None`` ends this branch.
- A handler's failure goes to its caller if the caller accepts
  ``SystemErrorPayload``, otherwise it climbs the chain to the nearest caller
  that does, ending at the client. A failure of the output itself (an unknown
  target, a payload the target refuses) goes to the handler's own listener if
  it accepts errors, and otherwise climbs the same way.

Everything comes back as :class:`~xml_pipeline.cluster.store.Effects`, so the
engine commits a step's outcome in one script call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from xml_pipeline.cluster.hop import Hop
from xml_pipeline.cluster.store import ClientReply, Effects
from xml_pipeline.handler import HandlerResponse
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.message.envelope import envelope_bytes
from xml_pipeline.message.payload_codec import payload_type_name
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.outcome import Failure, error_payload
from xml_pipeline.message_bus.outputs import OutputPreparer
from xml_pipeline.message_bus.thread_registry import chain_key, new_thread_id
from xml_pipeline.observe.events import Observation
from xml_pipeline.organism import Listener

log = logging.getLogger("xml_pipeline.pump")

SYSTEM_SENDER = "system"

ErrorNote = Callable[[ErrorCode, str, str, Hop], None]
"""Told of every SystemError a step produces: code, detail, listener, the hop that failed."""


class Router:
    def __init__(
        self,
        listeners: Callable[[], Mapping[str, Listener]],
        outputs: OutputPreparer,
        history: ContextBuffer,
        note_error: ErrorNote,
        observe: Observation,
    ) -> None:
        self._listeners = listeners
        self._outputs = outputs
        self._history = history
        self._note_error = note_error
        self._observe = observe

    # ------------------------------------------------------------------ entry points
    def opening(self, client: str, target: Listener, payload: Any, payload_xml: bytes) -> tuple[Hop, Effects]:
        """A client's accepted message: the conversation's first hop and what opening it writes."""
        conversation = new_thread_id()
        chain = (client, target.name)
        threads = (conversation, new_thread_id())
        hop = Hop(conversation, chain, threads, client, payload_type_name(type(payload)), payload_xml, decoded=payload)
        effects = Effects()
        effects.registrations += [
            (chain_key(conversation, chain[:1]), threads[0]),
            (chain_key(conversation, chain), threads[1]),
        ]
        hop = self._record(effects, hop, client, target.name)
        effects.hops.append(hop)
        return hop, effects

    def continuing(
        self, client: str, target: Listener, conversation: str, payload: Any, payload_xml: bytes
    ) -> tuple[Hop, Effects]:
        """A client's message on its live ``conversation``: one more hop of it, on a thread of its own."""
        chain = (client, target.name)
        threads = (conversation, new_thread_id())
        hop = Hop(conversation, chain, threads, client, payload_type_name(type(payload)), payload_xml, decoded=payload)
        effects = Effects()
        effects.registrations.append((chain_key(conversation, chain), threads[1]))
        hop = self._record(effects, hop, client, target.name)
        effects.hops.append(hop)
        return hop, effects

    def route(self, hop: Hop, listener: Listener, result: Any) -> Effects:
        """What ``listener``'s ``result`` for ``hop`` produces."""
        effects = Effects()
        if result is None:
            return effects
        if isinstance(result, Failure):
            self._note_error(result.code, result.detail, listener.name, hop)
            self._climb(effects, hop, result, listener.name)
            return effects
        failure = self._deliver(effects, hop, listener, result)
        if failure is not None:
            self._output_failed(effects, hop, listener, failure)
        return effects

    def failure(self, hop: Hop, listener_name: str, failure: Failure) -> Effects:
        """A hop that cannot be handled at all (dead-lettered, undecodable): its sender's side hears why."""
        effects = Effects()
        self._note_error(failure.code, failure.detail, listener_name, hop)
        self._climb(effects, hop, failure, listener_name)
        return effects

    # ------------------------------------------------------------------ results
    def _deliver(self, effects: Effects, hop: Hop, listener: Listener, result: Any) -> Failure | None:
        if not isinstance(result, HandlerResponse):
            kind = type(result).__name__
            return Failure(
                ErrorCode.BAD_RESPONSE, f"{listener.name} returned {kind}; a handler returns HandlerResponse or None"
            )
        if result.to is not None:
            return self._forward(effects, hop, listener, result.payload, result.to)
        if len(hop.chain) < 2:
            log.warning("response dropped: %s is the root of thread=%s and has no caller", listener.name, hop.thread)
            return None
        return self._respond(effects, hop.chain[:-1], hop.threads[:-1], hop, result.payload, listener.name)

    def _forward(self, effects: Effects, hop: Hop, listener: Listener, payload: Any, to: str) -> Failure | None:
        target = self._listeners().get(to)
        if target is None:
            return Failure(ErrorCode.UNKNOWN_TARGET, f"{listener.name} sent to {to!r}, which is no listener")
        if not listener.may_call(to):
            return Failure(ErrorCode.PEER_NOT_ALLOWED, f"{listener.name} may not send to {to!r}")
        prepared = self._outputs.for_listener(target, payload, listener.name)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        chain, threads = (*hop.chain, to), (*hop.threads, new_thread_id())
        effects.registrations.append((chain_key(hop.conversation, chain), threads[-1]))
        self._send(
            effects,
            Hop(
                hop.conversation,
                chain,
                threads,
                listener.name,
                payload_type_name(type(fresh)),
                payload_xml,
                decoded=fresh,
            ),
        )
        return None

    def _respond(
        self,
        effects: Effects,
        chain: tuple[str, ...],
        threads: tuple[str, ...],
        hop: Hop,
        payload: Any,
        sender: str,
    ) -> Failure | None:
        """Send ``payload`` to the head of ``chain`` (a listener, or the client at the root) on its thread."""
        if len(chain) == 1:
            return self._to_client(effects, hop, payload, sender)
        caller = self._listeners().get(chain[-1])
        if caller is None:
            return Failure(ErrorCode.UNKNOWN_TARGET, f"{sender}'s caller {chain[-1]!r} is no longer a listener")
        prepared = self._outputs.for_listener(caller, payload, sender)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        self._send(
            effects,
            Hop(hop.conversation, chain, threads, sender, payload_type_name(type(fresh)), payload_xml, decoded=fresh),
        )
        return None

    def _to_client(self, effects: Effects, hop: Hop, payload: Any, sender: str) -> Failure | None:
        client = hop.initiator
        prepared = self._outputs.for_client(payload, sender, client)
        if isinstance(prepared, Failure):
            return prepared
        fresh, payload_xml = prepared
        reply = Hop(hop.conversation, (client,), hop.threads[:1], sender, payload_type_name(type(fresh)), payload_xml)
        self._record(effects, reply, sender, client)
        envelope = envelope_bytes(sender, client, hop.conversation, payload_xml)
        effects.replies.append(ClientReply(envelope, reply.payload_type, payload_xml))
        return None

    def _send(self, effects: Effects, hop: Hop) -> None:
        effects.hops.append(self._record(effects, hop, hop.sender, hop.target))

    def _record(self, effects: Effects, hop: Hop, sender: str, to: str) -> Hop:
        """Append the hop to history; the hop as it travels, carrying its observation reference."""
        slot = self._history.append_op(
            hop.conversation,
            from_id=sender,
            to_id=to,
            hop_thread=hop.thread,
            payload_type=hop.payload_type,
            payload_xml=hop.payload_xml,
        )
        effects.history.append((slot.slot, hop.payload_xml))
        ref = self._observe.hop(hop.conversation, sender, to, hop.thread, hop.payload_type, hop.payload_xml)
        return replace(hop, trace=ref) if ref else hop

    # ------------------------------------------------------------------ errors
    def _output_failed(self, effects: Effects, hop: Hop, listener: Listener, failure: Failure) -> None:
        """``listener``'s output cannot go where it asked: tell the listener if it listens for errors, else climb."""
        self._note_error(failure.code, failure.detail, listener.name, hop)
        if listener.accepts_errors:
            self._error_to(effects, hop.chain, hop.threads, hop, failure, listener.name)
        else:
            self._climb(effects, hop, failure, listener.name)

    def _climb(self, effects: Effects, hop: Hop, failure: Failure, listener_name: str) -> None:
        """Carry an error up ``hop``'s chain to the nearest caller that takes errors, or to the client."""
        chain, threads = hop.chain, hop.threads
        while len(chain) > 1:
            chain, threads = chain[:-1], threads[:-1]
            if len(chain) == 1:
                self._error_to(effects, chain, threads, hop, failure, listener_name)
                return
            caller = self._listeners().get(chain[-1])
            if caller is not None and caller.accepts_errors:
                self._error_to(effects, chain, threads, hop, failure, listener_name)
                return
        log.error(
            "error had no caller to go to code=%s listener=%s thread=%s", failure.code.value, listener_name, hop.thread
        )

    def _error_to(
        self,
        effects: Effects,
        chain: tuple[str, ...],
        threads: tuple[str, ...],
        hop: Hop,
        failure: Failure,
        listener_name: str,
    ) -> None:
        problem = self._respond(effects, chain, threads, hop, error_payload(failure, listener_name), SYSTEM_SENDER)
        if problem is not None:  # the error itself could not be delivered: the client hears it instead
            detail = f"{failure.detail} (and it could not reach {chain[-1]}: {problem.detail})"
            self._respond(
                effects,
                hop.chain[:1],
                hop.threads[:1],
                hop,
                error_payload(Failure(failure.code, detail), listener_name),
                SYSTEM_SENDER,
            )
