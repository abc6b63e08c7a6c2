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
    return {
        "k": "hop",
        "id": event.hop,
        "parent": event.parent,
        "from": event.sender,
        "to": event.to,
        "thread": event.thread,
        "type": event.payload_type,
        "at": event.at,
        "xml": event.payload_xml.decode("utf-8", "replace"),
    }


def handled_record(event: HandledEvent) -> Record:
    return {
        "k": "handled",
        "id": event.hop,
        "listener": event.listener,
        "at": event.at,
        "seconds": event.seconds,
        "error": event.error,
    }


def error_record(event: ErrorEvent) -> Record:
    return {
        "k": "error",
        "id": event.hop,
        "listener": event.listener,
        "code": event.code,
        "detail": event.detail,
        "at": event.at,
    }


def end_record(at: float) -> Record:
    return {"k": "end", "at": at}


def encode(record: Record) -> bytes:
    """One line of newline-delimited JSON."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def decode_lines(data: bytes) -> list[Record]:
    return [json.loads(line) for line in data.splitlines() if line]
