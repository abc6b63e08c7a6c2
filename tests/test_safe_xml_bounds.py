"""The cheap depth bound and the encoding fast path in safe_xml never let through what the exact checks refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from xml_pipeline.message.safe_xml import (
    XmlLimits,
    XmlRejected,
    _could_be_deeper,
    _deeper_than,
    _refuse_foreign_encoding,
    parse_checked,
)
from xml_pipeline.message.system_payloads import ErrorCode

DEPTH = 8
LIMITS = XmlLimits(max_bytes=4096, max_depth=DEPTH)


def nested(depth: int, *, pad: int = 0, close_innermost: bool = False, attributes: bool = False) -> str:
    """``depth`` elements, each inside the one before; the innermost empty (``<a/>``) unless ``close_innermost``."""
    tag = "a" + "x" * pad
    opening = f'<{tag} k="v">' if attributes else f"<{tag}>"
    inner = f"{opening}</{tag}>" if close_innermost else f"<{tag}/>"
    return opening * (depth - 1) + inner + f"</{tag}>" * (depth - 1)


@pytest.mark.parametrize("close_innermost", [False, True])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_one_level_too_deep_is_refused_with_the_fewest_tags_it_can_have(encoding: str, close_innermost: bool) -> None:
    # padded names so the document is long enough that the byte-count bound is consulted at all
    text = nested(DEPTH + 1, pad=8, close_innermost=close_innermost)
    with pytest.raises(XmlRejected) as caught:
        parse_checked(text.encode(encoding), LIMITS)  # Python's utf-16 writes the byte order mark
    assert caught.value.code is ErrorCode.TOO_DEEP
    assert parse_checked(nested(DEPTH, pad=8).encode(encoding), LIMITS).root is not None


def test_a_repaired_document_with_its_elements_left_open_is_still_held_to_the_depth() -> None:
    text = "<axxxxxxxxxx>" * (DEPTH + 1)  # never closed: only the repairing parser takes it
    with pytest.raises(XmlRejected) as caught:
        parse_checked(text.encode(), XmlLimits(max_bytes=4096, max_depth=DEPTH, repair=True))
    assert caught.value.code is ErrorCode.TOO_DEEP
    assert not _could_be_deeper(text.encode(), DEPTH)  # the well-formed bound alone would not have looked


@settings(max_examples=300, deadline=None)
@given(
    depth=st.integers(min_value=1, max_value=3 * DEPTH),
    pad=st.integers(min_value=0, max_value=20),
    close_innermost=st.booleans(),
    attributes=st.booleans(),
    siblings=st.integers(min_value=0, max_value=3),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-16-le", "utf-16-be"]),
)
def test_the_byte_bound_says_could_be_whenever_the_document_is_deeper(
    depth: int, pad: int, close_innermost: bool, attributes: bool, siblings: int, encoding: str
) -> None:
    text = nested(depth, pad=pad, close_innermost=close_innermost, attributes=attributes)
    text = f"<r>{text}{'<s/>' * siblings}</r>"
    raw = text.encode(encoding)
    root = etree.fromstring(text)
    for max_depth in range(4, 3 * DEPTH):
        if _deeper_than(max_depth)(root):
            assert _could_be_deeper(raw, max_depth), (text, max_depth)
            assert _could_be_deeper(raw, max_depth, closed=False) or encoding != "utf-8", (text, max_depth)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("<a>x</a>".encode("utf-16-le"), ErrorCode.UNSUPPORTED_ENCODING),  # UTF-16 without its byte order mark
        ("<a>x</a>".encode("utf-16-be"), ErrorCode.UNSUPPORTED_ENCODING),
        (b'<?xml version="1.0" encoding="UTF-16"?><a/>', ErrorCode.UNSUPPORTED_ENCODING),
        ("<a>x</a>".encode("utf-32"), ErrorCode.UNSUPPORTED_ENCODING),
        ('<?xml version="1.0" encoding="IBM037"?><a/>'.encode("cp037"), ErrorCode.UNSUPPORTED_ENCODING),
    ],
)
def test_bytes_starting_with_a_less_than_sign_still_meet_the_encoding_checks(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(XmlRejected) as caught:
        parse_checked(raw, LIMITS)
    assert caught.value.code is code


@pytest.mark.parametrize("raw", [b"<a/>", b"<", b"<a>\xc3\xa9</a>", b'<?xml version="1.0"?><a/>', b"\xef\xbb\xbf<a/>"])
def test_utf8_markup_passes_the_encoding_check(raw: bytes) -> None:
    _refuse_foreign_encoding(raw)
