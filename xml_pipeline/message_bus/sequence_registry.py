"""State of running sequences (A -> B -> C), kept in the shared backend.

The calls and shapes are the reference design's (``create``, ``advance``,
``mark_failed``, ``is_complete``...), on a record in the backend, so on the
manager and Redis backends every process sees the same sequences. Each step's
result is its own field, written only if that step has none yet, so two
processes advancing at once never overwrite each other: each takes the next
step. As for buffers, ``system.sequence`` names its runs with 128 random bits
and a client's ``sequence_id`` is only a label echoed back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.process_wide import ProcessWide

KIND = "sequence"
_META = "meta"
_FAILED = "failed"
_RESULT = "r:"


@dataclass(frozen=True, slots=True)
class SequenceState:
    """A snapshot of one sequence: its steps, the results so far, and whether it failed."""

    sequence_id: str
    steps: list[str]
    return_to: str
    thread_id: str
    from_id: str
    current_index: int = 0
    results: list[str] = field(default_factory=list)
    last_result: str | None = None
    failed: bool = False
    failed_step: str | None = None
    error: str | None = None

    @property
    def is_complete(self) -> bool:
        """Every step ran, and none failed."""
        return not self.failed and self.current_index >= len(self.steps)

    @property
    def current_step(self) -> str | None:
        """The step to run next; None once complete or failed."""
        if self.failed or self.current_index >= len(self.steps):
            return None
        return self.steps[self.current_index]

    @property
    def remaining_steps(self) -> list[str]:
        return [] if self.failed else self.steps[self.current_index :]


class SequenceRegistry:
    def __init__(self, backend: SharedBackend | None = None) -> None:
        self.backend: SharedBackend = backend if backend is not None else InMemoryBackend()

    def create(
        self,
        sequence_id: str,
        steps: list[str],
        return_to: str,
        thread_id: str,
        from_id: str,
        initial_payload: str = "",
    ) -> SequenceState:
        """Start tracking a sequence; an id already in use starts over."""
        meta = {
            "steps": list(steps),
            "return_to": return_to,
            "thread_id": thread_id,
            "from_id": from_id,
            "initial_payload": initial_payload,
        }
        self.backend.record_delete(KIND, sequence_id)
        self.backend.record_put(KIND, sequence_id, _META, json.dumps(meta).encode())
        return SequenceState(
            sequence_id, list(steps), return_to, thread_id, from_id, last_result=initial_payload or None
        )

    def get(self, sequence_id: str) -> SequenceState | None:
        fields = self.backend.record_get(KIND, sequence_id)
        if _META not in fields:
            return None
        meta = json.loads(fields[_META])
        results: list[str] = []
        while (value := fields.get(f"{_RESULT}{len(results)}")) is not None:
            results.append(value.decode())
        failure = json.loads(fields[_FAILED]) if _FAILED in fields else None
        return SequenceState(
            sequence_id,
            meta["steps"],
            meta["return_to"],
            meta["thread_id"],
            meta["from_id"],
            current_index=len(results),
            results=results,
            last_result=results[-1] if results else meta["initial_payload"] or None,
            failed=failure is not None,
            failed_step=None if failure is None else failure["step"],
            error=None if failure is None else failure["error"],
        )

    def advance(self, sequence_id: str, step_result: str) -> SequenceState | None:
        """Record the current step's result and move to the next; None for an unknown sequence.

        A failed sequence does not advance: it is returned as it is.
        """
        while True:
            state = self.get(sequence_id)
            if state is None or state.failed:
                return state
            field_name = f"{_RESULT}{state.current_index}"
            if self.backend.record_put(KIND, sequence_id, field_name, step_result.encode(), only_if_absent=True):
                return self.get(sequence_id)

    def mark_failed(self, sequence_id: str, step: str, error: str) -> SequenceState | None:
        """Record that ``step`` failed with ``error``; None for an unknown sequence."""
        if self.get(sequence_id) is None:
            return None
        self.backend.record_put(KIND, sequence_id, _FAILED, json.dumps({"step": step, "error": error}).encode())
        return self.get(sequence_id)

    def remove(self, sequence_id: str) -> bool:
        return self.backend.record_delete(KIND, sequence_id)

    def list_active(self) -> list[str]:
        return self.backend.record_list(KIND)

    def clear(self) -> None:
        self.backend.record_clear(KIND)


_current: ProcessWide[SequenceRegistry] = ProcessWide(SequenceRegistry)


def get_sequence_registry() -> SequenceRegistry:
    """The process-wide SequenceRegistry (the running pump installs its own as this one)."""
    return _current.get()


set_sequence_registry = _current.set


def reset_sequence_registry() -> None:
    """Forget the process-wide registry (tests); its sequences stay in its backend."""
    _current.reset()
