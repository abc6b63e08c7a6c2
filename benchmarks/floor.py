"""The floor for one hop: what any XML pump must at least spend, with lxml and nothing else.

The same steps as ../shared/bench/lxml_floor.py (parse, validate the envelope
and the payload against XSD, read the payload's fields, build and serialize a
reply), on the same 1 KB envelope and the same derived payload schema the pump
uses, so the ratio compares like with like.
"""

from __future__ import annotations

import time

from lxml import etree

from benchmarks.workload import Order
from xml_pipeline.message.envelope import ENVELOPE_NS, ENVELOPE_SCHEMA
from xml_pipeline.message.payload_codec import codec_for

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def make_hop() -> tuple[etree.XMLSchema, etree.XMLSchema]:
    return ENVELOPE_SCHEMA, codec_for(Order).schema


def hop(raw: bytes, envelope_schema: etree.XMLSchema, payload_schema: etree.XMLSchema) -> bytes:
    root = etree.fromstring(raw, _PARSER)
    if not envelope_schema.validate(root):
        raise ValueError("envelope")
    payload = root[1]
    if not payload_schema.validate(etree.ElementTree(payload)):
        raise ValueError("payload")
    order_id = payload.findtext("order_id")
    lines = payload.find("lines")
    total = sum(
        int(line.findtext("quantity") or 0) * float(line.findtext("price") or 0)
        for line in (lines if lines is not None else [])
    )
    out = etree.Element(f"{{{ENVELOPE_NS}}}message", nsmap={"xp": ENVELOPE_NS})
    meta = etree.SubElement(out, f"{{{ENVELOPE_NS}}}meta")
    etree.SubElement(meta, f"{{{ENVELOPE_NS}}}from").text = "orders"
    etree.SubElement(meta, f"{{{ENVELOPE_NS}}}to").text = "console"
    etree.SubElement(meta, f"{{{ENVELOPE_NS}}}thread").text = root[0][-1].text
    reply = etree.SubElement(out, "Receipt")
    etree.SubElement(reply, "order_id").text = order_id
    etree.SubElement(reply, "total").text = repr(round(total, 2))
    return etree.tostring(out)


def floor_rate(raw: bytes, count: int) -> float:
    """Hops per second on one core."""
    schemas = make_hop()
    hop(raw, *schemas)
    started = time.perf_counter()
    for _ in range(count):
        hop(raw, *schemas)
    return count / (time.perf_counter() - started)
