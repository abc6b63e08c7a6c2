"""A conversation's records as a call tree, and that tree as text (``xml-pipeline trace``).

Each hop's parent is the hop whose handler sent it, so the tree reads as
"who caused what": the client's message, what its handler sent, what those
handlers sent, down to the answers going back. Siblings are in the order they
were sent. Records arrive in any order (several daemons write them), so the
tree is built from ids alone.
"""

from __future__ import annotations

import time
from typing import Any

from xml_pipeline.observe.records import Record


def assemble(conversation: str, records: list[Record], dropped: int, *, with_xml: bool) -> dict[str, Any]:
    """The trace as JSON: hops nested under their parents, each with its handling and errors."""
    hops: dict[str, dict[str, Any]] = {}
    handled: dict[str, list[Record]] = {}
    errors: dict[str, list[Record]] = {}
    ended: float | None = None
    for record in records:
        kind = record["k"]
        if kind == "hop":
            hop = {key: record[key] for key in ("id", "parent", "from", "to", "thread", "type", "at")}
            if with_xml:
                hop["xml"] = record["xml"]
            hops[record["id"]] = hop
        elif kind == "handled":
            handled.setdefault(record["id"], []).append(record)
        elif kind == "error":
            errors.setdefault(record["id"], []).append(record)
        elif kind == "end":
            ended = record["at"]
    roots: list[dict[str, Any]] = []
    for hop in sorted(hops.values(), key=lambda h: h["at"]):
        calls = sorted(handled.get(hop["id"], []), key=lambda r: r["at"])
        hop["handled"] = [{"at": c["at"], "seconds": c["seconds"], "error": c["error"]} for c in calls]
        hop["errors"] = [_error(e) for e in errors.get(hop["id"], [])]
        hop["children"] = []
        parent = hops.get(hop["parent"])
        (parent["children"] if parent is not None else roots).append(hop)
    unattached = [_error(e) for key, found in errors.items() if key not in hops for e in found]
    started = min((hop["at"] for hop in hops.values()), default=None)
    return {
        "conversation": conversation,
        "started": started,
        "ended": ended,
        "hops": roots,
        "hop_count": len(hops),
        "errors": unattached,
        "dropped": dropped,
    }


def _error(record: Record) -> dict[str, Any]:
    return {"listener": record["listener"], "code": record["code"], "detail": record["detail"], "at": record["at"]}


def render(trace: dict[str, Any], *, with_xml: bool = False) -> list[str]:
    """The tree as indented lines: from → to, payload type, time, handler latency and outcome."""
    started = trace["started"]
    state = "ended" if trace["ended"] is not None else "running"
    head = f"conversation {trace['conversation']} ({state}, {trace['hop_count']} hops"
    if started is not None:
        head += f", started {_clock(started)}"
    lines = [head + ")"]
    clients = {hop["from"] for hop in trace["hops"]}
    for hop in trace["hops"]:
        _render_hop(hop, 1, started or 0.0, with_xml, clients, lines)
    for error in trace["errors"]:
        lines.append(f"  ! {error['code']} at {error['listener'] or '-'}: {error['detail']}")
    if trace["dropped"]:
        lines.append(f"  ({trace['dropped']} events not kept: the trace reached trace_max_bytes)")
    return lines


def _render_hop(
    hop: dict[str, Any], depth: int, started: float, with_xml: bool, clients: set[str], lines: list[str]
) -> None:
    pad = "  " * depth
    kind = hop["type"].rpartition(":")[2]
    offset = (hop["at"] - started) * 1000
    when = f"{_clock(hop['at'])} (+{offset:.1f} ms)"
    lines.append(f"{pad}{hop['from']} → {hop['to']}  {kind}  {when}  {_outcome(hop, clients)}")
    for error in hop["errors"]:
        lines.append(f"{pad}  ! {error['code']} at {error['listener'] or '-'}: {error['detail']}")
    if with_xml and "xml" in hop:
        lines.append(f"{pad}  {hop['xml']}")
    for child in hop["children"]:
        _render_hop(child, depth + 1, started, with_xml, clients, lines)


def _outcome(hop: dict[str, Any], clients: set[str]) -> str:
    calls = hop["handled"]
    if not calls:
        return "to the client" if hop["to"] in clients else "not handled (yet)"
    parts = []
    for call in calls:
        latency = f"{call['seconds'] * 1000:.2f} ms"
        parts.append(f"handled in {latency}" if not call["error"] else f"failed {call['error']} after {latency}")
    return "; ".join(parts)


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"
