"""State of running sequences (A -> B -> C), kept in the shared backend.

As for buffers, ids are 128 random bits and a client's ``sequence_id`` is only
a label echoed back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message_bus.buffer_registry import new_run_id
from xml_pipeline.process_wide import ProcessWide

KIND = "sequence"


@dataclass(frozen=True, slots=True)
class SequenceState:
    sequence_id: str
    label: str
    steps: tuple[str, ...]
    return_to: str
    current_step: int
    created: float


class SequenceRegistry:
    def __init__(self, backend: SharedBackend | None = None) -> None:
        self.backend: SharedBackend = backend if backend is not None else InMemoryBackend()

    def create(self, *, steps: list[str], return_to: str = "", label: str = "") -> SequenceState:
        sequence_id = new_run_id()
        created = time.time()
        meta = {"label": label or sequence_id, "steps": steps, "return_to": return_to, "created": created}
        self.backend.record_put(KIND, sequence_id, "meta", json.dumps(meta).encode())
        self.backend.record_put(KIND, sequence_id, "step", b"0")
        return SequenceState(sequence_id, label or sequence_id, tuple(steps), return_to, 0, created)

    def get(self, sequence_id: str) -> SequenceState | None:
        fields = self.backend.record_get(KIND, sequence_id)
        if "meta" not in fields:
            return None
        meta = json.loads(fields["meta"])
        step = int(fields.get("step", b"0"))
        return SequenceState(sequence_id, meta["label"], tuple(meta["steps"]), meta["return_to"], step, meta["created"])

    def advance(self, sequence_id: str, step_index: int) -> None:
        """Record that the sequence is now running step ``step_index``."""
        self.backend.record_put(KIND, sequence_id, "step", str(step_index).encode())

    def remove(self, sequence_id: str) -> bool:
        return self.backend.record_delete(KIND, sequence_id)

    def list_active(self) -> list[str]:
        return self.backend.record_list(KIND)

    def clear(self) -> None:
        self.backend.record_clear(KIND)


_current: ProcessWide[SequenceRegistry] = ProcessWide(SequenceRegistry)
get_sequence_registry = _current.get
"""The process-wide SequenceRegistry (the running pump installs its own as this one)."""
set_sequence_registry = _current.set
reset_sequence_registry = _current.reset
