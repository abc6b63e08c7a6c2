"""What a daemon remembers of the conversations it opened, so that collecting their replies asks Redis nothing."""

from __future__ import annotations

import pytest

from xml_pipeline.cluster import opened_here
from xml_pipeline.cluster.opened_here import Opened, OpenedHere


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(opened_here.time, "monotonic", clock)
    return clock


def test_a_noted_conversation_is_recalled_with_its_owner_until_forgotten(clock: Clock) -> None:
    remembered = OpenedHere(60)
    remembered.note("c1", "alice")
    remembered.note("c2", None)
    assert remembered.recall("c1") == Opened("alice")
    assert remembered.recall("c2") == Opened(None)  # known, opened without a token: not the same as unknown
    assert remembered.recall("c3") is None
    remembered.forget("c1")
    assert remembered.recall("c1") is None


def test_nothing_is_recalled_past_the_reply_retention(clock: Clock) -> None:
    """Redis may have let its replies expire by then: the engine must ask."""
    remembered = OpenedHere(60)
    remembered.note("c1", "alice")
    clock.now += 60
    assert remembered.recall("c1") == Opened("alice")
    clock.now += 1
    assert remembered.recall("c1") is None
    assert len(remembered) == 0


def test_the_oldest_make_room(clock: Clock) -> None:
    remembered = OpenedHere(60, limit=2)
    for conversation in ("c1", "c2", "c3"):
        remembered.note(conversation, None)
    assert [remembered.recall(c) for c in ("c1", "c2", "c3")] == [None, Opened(None), Opened(None)]
