"""Trace records: each observed event as a small JSON object, the form both trace stores keep.

A conversation's trace is the list of its records in the order they were
made. Records carry ids, not positions, so records written by several daemons
(the durable engine) assemble into the same tree whatever order they land in.
"""

from __future__ import annotations

import json
from typing import Any

from xml_pipeline.observe.events import ErrorEvent, HandledEvent, HopEvent

Record = dict[str, Any]


def hop_record(event: HopEvent) -> Record:
    _, hop, parent, _, sender, to, thread, payload_type, payload_xml, at = event
    return {
        "k": "hop",
        "id": hop,
        "parent": parent,
        "from": sender,
        "to": to,
        "thread": thread,
        "type": payload_type,
        "at": at,
        "xml": payload_xml.decode("utf-8", "replace"),
    }


def handled_record(event: HandledEvent) -> Record:
    _, hop, _, listener, at, seconds, error = event
    return {"k": "handled", "id": hop, "listener": listener, "at": at, "seconds": seconds, "error": error}


def error_record(event: ErrorEvent) -> Record:
    _, hop, _, listener, code, detail, at = event
    return {"k": "error", "id": hop, "listener": listener, "code": code, "detail": detail, "at": at}


def event_record(event: HopEvent | HandledEvent | ErrorEvent) -> Record:
    """The record of any event, by its kind."""
    if event[0] == "hop":
        return hop_record(event)
    if event[0] == "handled":
        return handled_record(event)
    return error_record(event)


def end_record(at: float) -> Record:
    return {"k": "end", "at": at}


def encode(record: Record) -> bytes:
    """One line of newline-delimited JSON."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode_lines(data: bytes) -> list[Record]:
    return [json.loads(line) for line in data.splitlines() if line]
