"""The daemon's own decodes, kept for the hops it made: taken once, only for the same bytes, bounded."""

from __future__ import annotations

from xml_pipeline.cluster.decoded import DecodedPayloads


def test_a_payload_is_taken_once_and_only_for_the_bytes_it_was_decoded_from() -> None:
    kept = DecodedPayloads(capacity=8)
    payload = object()
    kept.keep("thread-1", b"<Ping/>", payload)
    kept.keep("thread-2", b"<Ping/>", object())
    assert kept.take("thread-1", b"<Ping/>") is payload
    assert kept.take("thread-1", b"<Ping/>") is None  # a second delivery decodes its own
    assert kept.take("thread-2", b"<Ping>changed</Ping>") is None
    assert len(kept) == 0


def test_the_oldest_go_first_when_full() -> None:
    kept = DecodedPayloads(capacity=3)
    for number in range(5):
        kept.keep(f"thread-{number}", b"<Ping/>", number)
    assert len(kept) == 3
    assert kept.take("thread-0", b"<Ping/>") is None
    assert kept.take("thread-4", b"<Ping/>") == 4
