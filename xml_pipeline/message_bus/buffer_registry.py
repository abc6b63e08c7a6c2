"""State of running buffers (fan-out / fan-in), kept in the shared backend.

Ids are 128 random bits: they name the ephemeral listener too, so a guessed
id could otherwise receive or forge results. A client's own ``buffer_id`` is
only a label echoed back for correlation; two requests with the same label
never share state. Results are written first-wins, so an item answered twice
keeps its first answer.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.process_wide import ProcessWide

KIND = "buffer"


@dataclass(frozen=True, slots=True)
class ItemResult:
    index: int
    success: bool
    result: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class BufferState:
    buffer_id: str
    label: str
    target: str
    total: int
    collect: bool
    return_to: str
    created: float
    results: dict[int, ItemResult]

    @property
    def complete(self) -> bool:
        return len(self.results) == self.total


def new_run_id() -> str:
    return secrets.token_hex(16)


class BufferRegistry:
    def __init__(self, backend: SharedBackend | None = None) -> None:
        self.backend: SharedBackend = backend if backend is not None else InMemoryBackend()

    def create(
        self, *, target: str, total: int, collect: bool = True, return_to: str = "", label: str = ""
    ) -> BufferState:
        buffer_id = new_run_id()
        state = BufferState(buffer_id, label or buffer_id, target, total, collect, return_to, time.time(), {})
        meta = {"label": state.label, "target": target, "total": total, "collect": collect, "return_to": return_to}
        self.backend.record_put(KIND, buffer_id, "meta", json.dumps({**meta, "created": state.created}).encode())
        return state

    def get(self, buffer_id: str) -> BufferState | None:
        fields = self.backend.record_get(KIND, buffer_id)
        if "meta" not in fields:
            return None
        meta = json.loads(fields["meta"])
        results = {}
        for name, value in fields.items():
            if name.startswith("r:"):
                data = json.loads(value)
                index = int(name[2:])
                results[index] = ItemResult(index, data["s"], data["x"], data["e"])
        return BufferState(
            buffer_id,
            meta["label"],
            meta["target"],
            meta["total"],
            meta["collect"],
            meta["return_to"],
            meta["created"],
            results,
        )

    def record_result(self, buffer_id: str, index: int, *, success: bool, result: str = "", error: str = "") -> bool:
        """Record item ``index``'s outcome; False if it already had one (the first answer stands)."""
        value = json.dumps({"s": success, "x": result, "e": error}).encode()
        return self.backend.record_put(KIND, buffer_id, f"r:{index}", value, only_if_absent=True)

    def remove(self, buffer_id: str) -> bool:
        return self.backend.record_delete(KIND, buffer_id)

    def list_active(self) -> list[str]:
        return self.backend.record_list(KIND)

    def clear(self) -> None:
        self.backend.record_clear(KIND)


_current: ProcessWide[BufferRegistry] = ProcessWide(BufferRegistry)
get_buffer_registry = _current.get
"""The process-wide BufferRegistry (the running pump installs its own as this one)."""
set_buffer_registry = _current.set
reset_buffer_registry = _current.reset
