"""The observation seam: what both engines report as work moves, and who listens.

The engines call five methods of :class:`Observation`, each from one line:

- :meth:`~Observation.hop` when a message is recorded on its way (to a
  listener's queue or stream, or into a client's mailbox); it returns the hop's
  reference, which the message carries to its handler (``_Delivery.hop`` in
  the pump, ``Hop.trace`` in a Redis stream, so any daemon can continue it);
- :meth:`~Observation.handling` just before a handler is called, and
  :meth:`~Observation.handled` when it is done, with its failure if any;
- :meth:`~Observation.error` for every SystemError, as the one log line is written;
- :meth:`~Observation.ended` when a conversation is over.

Which hop caused which is not passed around: the handler of a hop runs in a
task of its own, so :meth:`handling` puts the hop in a context variable and
every hop recorded later in that task (the handler's forwards and responses,
and the errors routed for it) names it as parent. A client's message has none.

Sinks (the trace store, the live tail, the graph's counters) get plain event
objects. OpenTelemetry is not an ordinary sink: it makes the span ids, which
then become the hop references. With nothing attached, every method returns at
once, so an organism nobody watches pays one attribute check per report.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from xml_pipeline.message.payload_codec import payload_type_name
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.outcome import Failure

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}\Z")
"""A W3C trace context header, version 00."""


def hop_id(ref: str) -> str:
    """The hop's own id (16 hex digits) from its reference: a bare id, or a traceparent whose span it is."""
    return ref[36:52] if len(ref) == 55 else ref


def valid_traceparent(value: str | None) -> str | None:
    """``value`` when it is a usable traceparent (ids not all zero), else None."""
    if value is None:
        return None
    value = value.strip().lower()
    match = TRACEPARENT.match(value)
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return value


@dataclass(slots=True)
class HopEvent:
    """A message recorded on its way: to a listener, or to the conversation's client."""

    hop: str
    """This hop's id: 16 hex digits, unique."""
    parent: str
    """The id of the hop whose handler sent this one; "" for a client's message."""
    conversation: str
    sender: str
    to: str
    thread: str
    payload_type: str
    payload_xml: bytes
    at: float
    """Wall-clock seconds."""


@dataclass(slots=True)
class HandledEvent:
    hop: str
    conversation: str
    listener: str
    at: float
    """When the handler started (wall clock)."""
    seconds: float
    error: str
    """The failure's code, "" when the handler finished well."""


@dataclass(slots=True)
class ErrorEvent:
    hop: str
    """The hop being handled when the error arose; "" for a client's message refused on arrival."""
    conversation: str
    listener: str
    code: str
    detail: str
    at: float


class Sink:
    """Told of everything; override what you need. Calls come on the event loop's hot path: never block."""

    def hop(self, event: HopEvent) -> None:
        """A message was recorded on its way."""

    def handled(self, event: HandledEvent) -> None:
        """A handler finished (well, or with ``event.error``)."""

    def error(self, event: ErrorEvent) -> None:
        """A SystemError was produced."""

    def ended(self, conversation: str, at: float) -> None:
        """The conversation is over: nothing of it is queued or being handled."""


class SpanMaker(Protocol):
    """Makes the spans (OpenTelemetry): the hop references are its span contexts."""

    def hop_span(
        self, conversation: str, sender: str, to: str, thread: str, payload_type: str, parent: str | None
    ) -> str:
        """Record the hop's span under ``parent`` (a traceparent); the hop's own traceparent."""
        ...

    def start_handler(self, ref: str, listener: str, conversation: str) -> tuple[Any, str]:
        """Open the handler's span under the hop ``ref``: (the span, its traceparent)."""
        ...

    def end_handler(self, span: Any, error: str, seconds: float) -> None: ...

    def ended(self, conversation: str) -> None: ...


@dataclass(slots=True)
class _Cause:
    """The hop whose handler runs in this task (or, at the door, the caller's trace context)."""

    hop: str
    conversation: str
    listener: str
    started: float
    at: float
    traceparent: str | None
    span: Any = None


_CAUSE: ContextVar[_Cause | None] = ContextVar("xml_pipeline_cause", default=None)
_TYPE_NAMES: dict[type, str] = {}


def _type_name(cls: type) -> str:
    """``payload_type_name``, remembered: it is asked for on every hop, of a handful of classes."""
    name = _TYPE_NAMES.get(cls)
    if name is None:
        name = _TYPE_NAMES[cls] = payload_type_name(cls)
    return name


class Observation:
    def __init__(self) -> None:
        self.sinks: tuple[Sink, ...] = ()
        self.spans: SpanMaker | None = None
        self._watched = False

    @property
    def watched(self) -> bool:
        return self._watched

    def attach(self, sink: Sink) -> None:
        self.sinks = (*self.sinks, sink)
        self._watched = True

    def attach_spans(self, spans: SpanMaker) -> None:
        self.spans = spans
        self._watched = True

    # ------------------------------------------------------------------ what the engines call
    def hop(
        self,
        conversation: str,
        sender: str,
        to: str,
        thread: str,
        payload_type: str | type,
        payload_xml: bytes,
    ) -> str:
        """A message recorded on its way; its reference ("" when nobody watches)."""
        if not self._watched:
            return ""
        cause = _CAUSE.get()
        parent = hop_id(cause.hop) if cause is not None and cause.conversation == conversation else ""
        kind = payload_type if isinstance(payload_type, str) else _type_name(payload_type)
        if self.spans is None:
            ref = own = f"{random.getrandbits(64):016x}"
        else:
            ref = self.spans.hop_span(
                conversation, sender, to, thread, kind, cause.traceparent if cause is not None else None
            )
            own = hop_id(ref)
        event = HopEvent(own, parent, conversation, sender, to, thread, kind, payload_xml, time.time())
        for sink in self.sinks:
            sink.hop(event)
        return ref

    def handling(self, ref: str, conversation: str, listener: str) -> None:
        """``listener``'s handler is about to run for the hop ``ref``, in this task."""
        if not self._watched:
            return
        cause = _Cause(ref, conversation, listener, time.perf_counter(), time.time(), None)
        if self.spans is not None and ref:
            cause.span, cause.traceparent = self.spans.start_handler(ref, listener, conversation)
        _CAUSE.set(cause)

    def handled(self, outcome: object) -> None:
        """The handler started by :meth:`handling` in this task is done; ``outcome`` is what it came to."""
        cause = _CAUSE.get()
        if not self._watched or cause is None or not cause.listener:
            return
        seconds = time.perf_counter() - cause.started
        error = outcome.code.value if isinstance(outcome, Failure) else ""
        if cause.span is not None and self.spans is not None:
            self.spans.end_handler(cause.span, error, seconds)
        event = HandledEvent(hop_id(cause.hop), cause.conversation, cause.listener, cause.at, seconds, error)
        for sink in self.sinks:
            sink.handled(event)

    def error(self, conversation: str, code: ErrorCode, detail: str, listener: str | None) -> None:
        if not self._watched:
            return
        cause = _CAUSE.get()
        hop = hop_id(cause.hop) if cause is not None and cause.conversation == conversation else ""
        event = ErrorEvent(hop, conversation, listener or "", code.value, detail, time.time())
        for sink in self.sinks:
            sink.error(event)

    def ended(self, conversation: str) -> None:
        if not self._watched:
            return
        if self.spans is not None:
            self.spans.ended(conversation)
        at = time.time()
        for sink in self.sinks:
            sink.ended(conversation, at)

    def traceparent(self) -> str | None:
        """The trace context of the handler running in this task, to hand to a worker process."""
        cause = _CAUSE.get()
        return cause.traceparent if cause is not None else None

    @staticmethod
    @contextlib.contextmanager
    def joining(traceparent: str | None) -> Iterator[None]:
        """Within the block, a caller's trace context (a ``traceparent`` header) parents what is recorded."""
        valid = valid_traceparent(traceparent)
        if valid is None:
            yield
            return
        token = _CAUSE.set(_Cause("", "", "", 0.0, 0.0, valid))
        try:
            yield
        finally:
            _CAUSE.reset(token)
