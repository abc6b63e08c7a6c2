"""A daemon's collector settings: what is alive once it is loaded is frozen, and collections are spaced out."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from xml_pipeline.collector import OLDER_COLLECTION_EVERY, YOUNG_COLLECTION_EVERY, settle_for_serving


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """The test process's own settings again afterwards (settling is process-wide)."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_settling_freezes_what_is_alive_and_spaces_collections_out() -> None:
    loaded = [object() for _ in range(10)]  # alive when the daemon has loaded
    settle_for_serving()
    assert gc.get_freeze_count() > len(loaded)
    assert gc.get_threshold() == (YOUNG_COLLECTION_EVERY, OLDER_COLLECTION_EVERY, OLDER_COLLECTION_EVERY)
    assert YOUNG_COLLECTION_EVERY > 700  # CPython's default, which the in-flight messages crossed every few hops


@pytest.mark.usefixtures("restored_collector")
def test_cyclic_garbage_made_after_settling_is_still_collected() -> None:
    settle_for_serving()

    class Node:
        partner: object = None

    first, second = Node(), Node()
    first.partner, second.partner = second, first
    del first, second
    assert gc.collect() >= 2
