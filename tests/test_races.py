"""Several processes at once on the same chains and the same thread: nothing lost, nothing doubled."""

from __future__ import annotations

import multiprocessing
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from tests import race_workers
from xml_pipeline.memory.context_buffer import ContextBuffer
from xml_pipeline.memory.shared_backend import SharedBackend

PROCESSES = 4


def pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(PROCESSES, mp_context=multiprocessing.get_context("spawn"))


def test_racing_get_or_create_agrees_on_one_uuid_per_chain(shared_backend: SharedBackend) -> None:
    conversation = str(uuid.uuid4())
    chains = [["console", f"listener{i % 10}", "system.buffer"] for i in range(50)]
    with pool() as executor:
        results = list(
            executor.map(
                race_workers.claim_chains,
                [shared_backend.spec] * PROCESSES,
                [conversation] * PROCESSES,
                [chains] * PROCESSES,
            )
        )  # type: ignore[attr-defined]
    assert all(result == results[0] for result in results)
    per_chain = dict(zip((tuple(chain) for chain in chains), results[0], strict=True))
    assert len(set(per_chain.values())) == 10
    assert len(shared_backend.registry_list_all()) == 10


def test_racing_appends_to_one_thread_lose_and_duplicate_nothing(shared_backend: SharedBackend) -> None:
    thread = str(uuid.uuid4())
    count = 200
    with pool() as executor:
        indices = list(
            executor.map(
                race_workers.append_slots,
                [shared_backend.spec] * PROCESSES,
                [thread] * PROCESSES,
                range(PROCESSES),
                [count] * PROCESSES,
            )
        )  # type: ignore[attr-defined]
    all_indices = sorted(index for writer in indices for index in writer)
    assert all_indices == list(range(PROCESSES * count))
    for writer in indices:
        assert writer == sorted(writer)  # each writer's own appends keep their order
    slots = ContextBuffer(shared_backend).get_thread(thread)
    assert [slot.index for slot in slots] == list(range(PROCESSES * count))
    assert Counter(slot.from_id for slot in slots) == {f"w{i}": count for i in range(PROCESSES)}
    for writer in range(PROCESSES):
        mine = [slot.payload_xml for slot in slots if slot.from_id == f"w{writer}"]
        assert mine == [f"<T>{i}</T>".encode() for i in range(count)]
