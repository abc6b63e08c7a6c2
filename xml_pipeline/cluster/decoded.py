"""Payloads this daemon decoded already, for the hops it will most likely handle itself.

A client's message is parsed, validated and decoded at the door, and a
handler's output is validated and decoded afresh before it travels
(:mod:`xml_pipeline.message_bus.outputs`). When the same daemon then takes
that hop from its stream, doing all of it again from the stored bytes would
double the XML work of every hop. So the fresh payload waits here, keyed by
the hop's thread (a new UUID per hop), and the daemon that handles the hop
uses it if the stored bytes are the very bytes it was decoded from and its
class is still what the listener accepts. A hop handled by another daemon, or
a second delivery, misses and is decoded from Redis as before.

Bounded by count; the oldest entries go first (their hops went elsewhere).
Each entry is taken once, so no two handler calls share an object.
"""

from __future__ import annotations

from typing import Any


class DecodedPayloads:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: dict[str, tuple[bytes, Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, thread: str, payload_xml: bytes, payload: Any) -> None:
        if len(self._entries) >= self._capacity:
            del self._entries[next(iter(self._entries))]
        self._entries[thread] = (payload_xml, payload)

    def take(self, thread: str, payload_xml: bytes) -> Any | None:
        """The payload decoded from exactly ``payload_xml`` for ``thread``, once; None otherwise."""
        entry = self._entries.pop(thread, None)
        if entry is None or entry[0] != payload_xml:
            return None
        return entry[1]
