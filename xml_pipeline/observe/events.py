"""The observation seam: what both engines report as work moves, and who listens.

The engines call five methods of :class:`Observation`, each from one line:

- :meth:`~Observation.hop` when a message is recorded on its way (to a
  listener's queue or stream, or into a client's mailbox); it returns the hop's
  reference, which the message carries to its handler (``Delivery.hop`` in
  the pump, ``Hop.trace`` in a Redis stream, so any daemon can continue it);
- :meth:`~Observation.handling` just before a handler is called, and
  :meth:`~Observation.handled` when it is done, with its failure if any;
- :meth:`~Observation.error` for every SystemError, as the one log line is written;
- :meth:`~Observation.ended` when a conversation is over.

Which hop caused which is not passed around: the handler of a hop runs in a
task of its own, so :meth:`handling` puts the hop in a context variable and
every hop recorded later in that task (the handler's forwards and responses,
and the errors routed for it) names it as parent. A client's message has none.

Sinks (the trace store, the live tail, the graph's counters) get the events
as plain tuples. OpenTelemetry is not an ordinary sink: it makes the span ids, which
then become the hop references. With nothing attached, every method returns at
once, so an organism nobody watches pays one attribute check per report.

Everything here runs on every hop of a watched organism, so it does as little
as it can and leaves the rest to whoever reads (measurement 8 of
docs/benchmarks.md): events are plain tuples, a hop id is a counter formatted
once, and each report calls only the sinks that listen for its kind (a sink
that does not override a method of :class:`Sink` is never called for it).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Literal, Protocol

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


HopEvent = tuple[Literal["hop"], str, str, str, str, str, str, str, bytes, float]
"""A message recorded on its way, to a listener or to the conversation's client:
``("hop", hop, parent, conversation, sender, to, thread, payload_type, payload_xml, at)``.

``hop`` is its id (16 hex digits, unique); ``parent`` the id of the hop whose
handler sent it, "" for a client's message; ``at`` wall-clock seconds.

Events are plain tuples, named by their first item like the records'
``"k"``: one is made on every hop, and a tuple costs a fraction of any object
with named fields, to build, to read (sinks unpack it) and to keep (the
garbage collector stops tracking a tuple of strings and numbers)."""

HandledEvent = tuple[Literal["handled"], str, str, str, float, float, str]
"""A handler finished: ``("handled", hop, conversation, listener, at, seconds, error)``.

``at`` is when it started (wall clock), ``error`` the failure's code, "" when it finished well."""

ErrorEvent = tuple[Literal["error"], str, str, str, str, str, float]
"""A SystemError: ``("error", hop, conversation, listener, code, detail, at)``.

``hop`` is the hop being handled when it arose, "" for a client's message refused on arrival."""


class Sink:
    """Told of everything; override what you need. Calls come on the event loop's hot path: never block.

    A method left as it is here is never called (the observation skips it), nor
    is a sink that is not :meth:`listening`."""

    def listening(self) -> bool:
        """Whether to be told of anything for now. A sink whose answer changes calls what it got in :meth:`attached`."""
        return True

    def attached(self, changed: Callable[[], None]) -> None:
        """Attached to an observation, which asks :meth:`listening` again whenever ``changed()`` is called."""

    def hop(self, event: HopEvent) -> None:
        """A message was recorded on its way."""

    def handled(self, event: HandledEvent) -> None:
        """A handler finished (well, or with an error code)."""

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


_Cause = tuple[str, str, str, float, float, str | None, Any]
"""The hop whose handler runs in this task (or, at the door, the caller's trace context):
``(hop, conversation, listener, started, at, traceparent, span)``: the hop's own id
(what the hops its handler sends name as parent), ``time.perf_counter()`` and the
wall clock when the handler started, and with OpenTelemetry, its span and context."""


_CAUSE: ContextVar[_Cause | None] = ContextVar("xml_pipeline_cause", default=None)
_TYPE_NAMES: dict[type | str, str] = {}
_wall_clock = time.time
_timer = time.perf_counter


def _hop_numbers() -> Callable[[], int]:
    """Hop ids count up from a random start in [2**63, 2**63 + 2**62), so each is 16 hex digits, unique in
    this process, and unlikely to meet another daemon's (their ranges would have to overlap). Formatting a
    counter costs a quarter of what a fresh random number does, on every hop."""
    return itertools.count(1 << 63 | random.getrandbits(62)).__next__


def _restart_hop_numbers() -> None:
    """A forked process (another daemon) counts from a start of its own."""
    global _next_hop_number
    _next_hop_number = _hop_numbers()


_next_hop_number = _hop_numbers()
os.register_at_fork(after_in_child=_restart_hop_numbers)


def _kind(payload_type: type | str) -> str:
    """``payload_type_name``, remembered per class: it is asked for on every hop, of a handful of classes."""
    if isinstance(payload_type, str):
        return payload_type
    name = _TYPE_NAMES[payload_type] = payload_type_name(payload_type)
    return name


def _overrides(sink: Sink, method: str) -> bool:
    return getattr(type(sink), method, None) is not getattr(Sink, method)


class Observation:
    def __init__(self) -> None:
        self.sinks: tuple[Sink, ...] = ()
        self.spans: SpanMaker | None = None
        self._watched = False
        self._on_hop: tuple[Callable[[HopEvent], None], ...] = ()
        self._on_handled: tuple[Callable[[HandledEvent], None], ...] = ()
        self._on_error: tuple[Callable[[ErrorEvent], None], ...] = ()
        self._on_ended: tuple[Callable[[str, float], None], ...] = ()

    @property
    def watched(self) -> bool:
        return self._watched

    def attach(self, sink: Sink) -> None:
        """From now on ``sink`` is told, while it is listening, of the kinds of event it overrides."""
        self.sinks = (*self.sinks, sink)
        self._watched = True
        sink.attached(self._route)
        self._route()

    def _route(self) -> None:
        """Who is told of what: per kind, the methods (bound now) of the listening sinks that override it."""
        sinks = [sink for sink in self.sinks if sink.listening()]
        self._on_hop = tuple(s.hop for s in sinks if _overrides(s, "hop"))
        self._on_handled = tuple(s.handled for s in sinks if _overrides(s, "handled"))
        self._on_error = tuple(s.error for s in sinks if _overrides(s, "error"))
        self._on_ended = tuple(s.ended for s in sinks if _overrides(s, "ended"))

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
        kind = _TYPE_NAMES.get(payload_type) or _kind(payload_type)
        if self.spans is None:
            ref = own = _next_hop_number().to_bytes(8).hex()
        else:
            caller = cause[5] if cause is not None else None  # the cause's traceparent
            ref = self.spans.hop_span(conversation, sender, to, thread, kind, caller)
            own = hop_id(ref)
        parent = cause[0] if cause is not None and cause[1] == conversation else ""  # the cause's hop, if ours
        event: HopEvent = ("hop", own, parent, conversation, sender, to, thread, kind, payload_xml, _wall_clock())
        for sink in self._on_hop:
            sink(event)
        return ref

    def handling(self, ref: str, conversation: str, listener: str) -> None:
        """``listener``'s handler is about to run for the hop ``ref``, in this task."""
        if not self._watched:
            return
        span = traceparent = None
        if self.spans is not None and ref:
            span, traceparent = self.spans.start_handler(ref, listener, conversation)
        own = ref[36:52] if len(ref) == 55 else ref  # hop_id(ref), without a call
        _CAUSE.set((own, conversation, listener, _timer(), _wall_clock(), traceparent, span))

    def handled(self, outcome: object) -> None:
        """The handler started by :meth:`handling` in this task is done; ``outcome`` is what it came to."""
        if not self._watched:
            return
        cause = _CAUSE.get()
        if cause is None:
            return
        hop, conversation, listener, started, at, _, span = cause
        if not listener:
            return
        seconds = _timer() - started
        error = outcome.code.value if isinstance(outcome, Failure) else ""
        if span is not None and self.spans is not None:
            self.spans.end_handler(span, error, seconds)
        event: HandledEvent = ("handled", hop, conversation, listener, at, seconds, error)
        for sink in self._on_handled:
            sink(event)

    def error(self, conversation: str, code: ErrorCode, detail: str, listener: str | None) -> None:
        if not self._watched:
            return
        cause = _CAUSE.get()
        hop = cause[0] if cause is not None and cause[1] == conversation else ""
        event: ErrorEvent = ("error", hop, conversation, listener or "", code.value, detail, _wall_clock())
        for sink in self._on_error:
            sink(event)

    def ended(self, conversation: str) -> None:
        if not self._watched:
            return
        if self.spans is not None:
            self.spans.ended(conversation)
        if self._on_ended:
            at = _wall_clock()
            for sink in self._on_ended:
                sink(conversation, at)

    def traceparent(self) -> str | None:
        """The trace context of the handler running in this task, to hand to a worker process."""
        cause = _CAUSE.get()
        return cause[5] if cause is not None else None

    @staticmethod
    @contextlib.contextmanager
    def joining(traceparent: str | None) -> Iterator[None]:
        """Within the block, a caller's trace context (a ``traceparent`` header) parents what is recorded."""
        valid = valid_traceparent(traceparent)
        if valid is None:
            yield
            return
        token = _CAUSE.set(("", "", "", 0.0, 0.0, valid, None))
        try:
            yield
        finally:
            _CAUSE.reset(token)
