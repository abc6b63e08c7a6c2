"""CPU microseconds of each XML step of a pump round trip, each called alone on the Order envelope.

    .venv/bin/python -m benchmarks.xml_steps [calls]

The steps are the ones docs/benchmarks.md lists for issue 14 (parsing with the
safety checks, reading the envelope, validating and decoding the payload,
writing it back out, the reply written, checked and decoded, its envelope),
timed with ``time.process_time()`` around ``calls`` calls each (default 20,000).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from lxml import etree

from benchmarks.measure import envelope
from benchmarks.workload import Order, Receipt, sample_order
from xml_pipeline.message.envelope import envelope_bytes, read_envelope
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message.safe_xml import XmlLimits, parse_checked
from xml_pipeline.message_bus.outputs import OutputPreparer

THREAD = "00000000-0000-0000-0000-000000000000"


def _timed(step: Callable[[], Any], calls: int) -> float:
    step()
    began = time.process_time()
    for _ in range(calls):
        step()
    return (time.process_time() - began) / calls * 1e6


def steps() -> dict[str, Callable[[], Any]]:
    raw = envelope(sample_order(), "orders")
    limits = XmlLimits()
    root = parse_checked(raw, limits).root
    payload = read_envelope(root).payload
    codec = codec_for(Order)
    receipt = Receipt("ORD-00000000", 123.45, 8)
    receipt_xml = codec_for(Receipt).to_bytes(receipt)
    preparer = OutputPreparer(limits)
    return {
        "parse_checked": lambda: parse_checked(raw, limits),
        "read_envelope": lambda: read_envelope(root),
        "validate Order": lambda: codec.validate(payload),
        "from_element Order": lambda: codec.from_element(payload),
        "tostring Order": lambda: etree.tostring(payload),
        "reply for_client": lambda: preparer.for_client(receipt, "orders", "console"),
        "reply envelope": lambda: envelope_bytes("orders", "console", THREAD, receipt_xml),
    }


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    total = 0.0
    for name, step in steps().items():
        spent = _timed(step, calls)
        total += spent
        print(f"{name:20s} {spent:6.2f} us")
    print(f"{'sum':20s} {total:6.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
