"""The web view's graph totals: messages per edge and handling per listener, in bounded tables."""

from __future__ import annotations

from tests.support import Ping
from xml_pipeline.observe.graph import MAX_ENTRIES, GraphStats
from xml_pipeline.organism import Listener


async def _pong(payload: Ping, metadata: object) -> None:
    return None


def test_the_graph_counts_messages_per_edge_and_handling_per_listener() -> None:
    graph = GraphStats()
    for sender, to in [("console", "a"), ("a", "b"), ("console", "a"), ("b", "console")]:
        graph.hop(("hop", "h", "", "c", sender, to, "t", "Ping", b"", 0.0))
    graph.handled(("handled", "h", "c", "a", 0.0, 0.25, ""))
    graph.handled(("handled", "h", "c", "a", 0.0, 0.5, "handler-error"))
    graph.error(("error", "h", "c", "a", "handler-error", "boom", 0.0))
    snapshot = graph.snapshot({"a": Listener("a", [Ping], _pong)})
    assert snapshot["edges"] == [
        {"from": "a", "to": "b", "messages": 1},
        {"from": "b", "to": "console", "messages": 1},
        {"from": "console", "to": "a", "messages": 2},
    ]
    (node,) = snapshot["listeners"]
    assert (node["handled"], node["errors"], node["seconds"], node["slowest_seconds"]) == (2, 1, 0.75, 0.5)


def test_the_edge_table_stops_growing_but_its_edges_keep_counting() -> None:
    graph = GraphStats()
    for index in range(MAX_ENTRIES + 10):
        graph.hop(("hop", "h", "", "c", f"client-{index}", "a", "t", "Ping", b"", 0.0))
    graph.hop(("hop", "h", "", "c", "client-0", "a", "t", "Ping", b"", 0.0))
    edges = graph.snapshot({})["edges"]
    assert len(edges) == MAX_ENTRIES
    assert {"from": "client-0", "to": "a", "messages": 2} in edges
