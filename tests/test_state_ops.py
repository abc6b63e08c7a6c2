"""The state ops are values: immutable, hashable, equal only to an op of the same kind and fields."""

from __future__ import annotations

import pickle

import pytest

from xml_pipeline.memory.state_ops import AppendSlot, DeleteHistory, ForgetThread, RegisterThread


def test_ops_of_different_kinds_are_never_equal() -> None:
    assert ForgetThread("t") != DeleteHistory("t")
    assert not ForgetThread("t") == DeleteHistory("t")  # noqa: SIM201 (__eq__ itself, not __ne__)
    assert ForgetThread("t") != ("t",)
    assert ForgetThread("t") == ForgetThread("t")
    assert AppendSlot("t", b"<a/>", 1, None) == AppendSlot("t", b"<a/>", 1, None)
    assert AppendSlot("t", b"<a/>", 1, None) != AppendSlot("t", b"<a/>", 2, None)
    assert len({ForgetThread("t"), ForgetThread("t"), RegisterThread("c", "t")}) == 2


def test_ops_cannot_be_changed() -> None:
    op = RegisterThread("chain", "uuid")
    with pytest.raises(AttributeError):
        op.uuid = "other"  # type: ignore[misc]


def test_ops_survive_pickling_for_a_manager_backend() -> None:
    ops = [RegisterThread("c", "u"), AppendSlot("t", b"<a/>", None, 3), ForgetThread("u"), DeleteHistory("t")]
    assert pickle.loads(pickle.dumps(ops)) == ops
    assert [type(op) for op in pickle.loads(pickle.dumps(ops))] == [type(op) for op in ops]
