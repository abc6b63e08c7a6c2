"""State of running buffers (fan-out / fan-in), kept in the shared backend.

The calls and shapes are the reference design's (``create``, ``record_result``
returning the updated :class:`BufferState`, ``is_complete``...), but the state
is a record in the backend rather than a dict in one process, so on the
manager and Redis backends every process sees the same buffers.

Each item's result is its own field, written only if the item has none yet:
the first answer to an item wins, atomically, however many threads or
processes answer at once, and the counts are derived from the results, so
they cannot drift from them.

The ``system.buffer`` primitive names its runs with :func:`new_run_id` (128
random bits): the id names the ephemeral listener too, so a guessed id could
otherwise receive or forge results. A client's own ``buffer_id`` is only a
label echoed back.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.process_wide import ProcessWide

KIND = "buffer"
_META = "meta"
_RESULT = "r:"


@dataclass(frozen=True, slots=True)
class BufferItemResult:
    """One item's outcome: its answer (XML) or why it failed."""

    index: int
    result: str
    success: bool = True
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BufferState:
    """A snapshot of one buffer: what was sent where, and the results so far."""

    buffer_id: str
    total_items: int
    return_to: str
    thread_id: str
    from_id: str
    target: str
    collect: bool = True
    results: dict[int, BufferItemResult] = field(default_factory=dict)
    completed_count: int = 0
    successful_count: int = 0

    @property
    def is_complete(self) -> bool:
        """Every item has a result."""
        return self.completed_count >= self.total_items

    @property
    def pending_count(self) -> int:
        return self.total_items - self.completed_count

    def get_ordered_results(self) -> list[BufferItemResult | None]:
        """The results in item order, None where an item has none yet."""
        return [self.results.get(index) for index in range(self.total_items)]


def new_run_id() -> str:
    return secrets.token_hex(16)


def _encode_result(result: str, success: bool, error: str | None) -> bytes:
    """One item's outcome as ``<success 0|1><error's length, empty for None>:<error><result>``.

    Written once per item of every buffer, so plainer than JSON: the lengths
    say where each part ends, whatever the text holds.
    """
    if error is None:
        return f"{int(success)}:{result}".encode()
    return f"{int(success)}{len(error)}:{error}{result}".encode()


def _decode_result(index: int, value: bytes) -> BufferItemResult:
    text = value.decode()
    colon = text.index(":")
    success = text[0] == "1"
    if colon == 1:
        return BufferItemResult(index, text[2:], success, None)
    end = colon + 1 + int(text[1:colon])
    return BufferItemResult(index, text[end:], success, text[colon + 1 : end])


class BufferRegistry:
    def __init__(self, backend: SharedBackend | None = None) -> None:
        self.backend: SharedBackend = backend if backend is not None else InMemoryBackend()

    def create(
        self,
        buffer_id: str,
        total_items: int,
        return_to: str,
        thread_id: str,
        from_id: str,
        target: str,
        collect: bool = True,
    ) -> BufferState:
        """Start tracking a buffer of ``total_items`` items; an id already in use starts over."""
        meta = {
            "total_items": total_items,
            "return_to": return_to,
            "thread_id": thread_id,
            "from_id": from_id,
            "target": target,
            "collect": collect,
        }
        self.backend.record_delete(KIND, buffer_id)
        self.backend.record_put(KIND, buffer_id, _META, json.dumps(meta).encode())
        return BufferState(buffer_id, total_items, return_to, thread_id, from_id, target, collect)

    def get(self, buffer_id: str) -> BufferState | None:
        fields = self.backend.record_get(KIND, buffer_id)
        if _META not in fields:
            return None
        meta = json.loads(fields[_META])
        results: dict[int, BufferItemResult] = {}
        for name, value in fields.items():
            if name.startswith(_RESULT):
                index = int(name[len(_RESULT) :])
                results[index] = _decode_result(index, value)
        return BufferState(
            buffer_id,
            meta["total_items"],
            meta["return_to"],
            meta["thread_id"],
            meta["from_id"],
            meta["target"],
            meta["collect"],
            results,
            completed_count=len(results),
            successful_count=sum(1 for item in results.values() if item.success),
        )

    def record_result(
        self, buffer_id: str, index: int, result: str, success: bool = True, error: str | None = None
    ) -> BufferState | None:
        """Record item ``index``'s outcome and return the buffer as it now is.

        None for an unknown buffer. The first result for an index stands: a
        second one changes nothing. IndexError for an index outside the buffer.
        """
        state = self.get(buffer_id)
        if state is None:
            return None
        if not 0 <= index < state.total_items:
            raise IndexError(f"buffer {buffer_id} has items 0 to {state.total_items - 1}, not {index}")
        self.store_result(buffer_id, index, result, success, error)
        updated = self.get(buffer_id)
        if updated is None:  # removed while we wrote: take our write away with it
            self.backend.record_delete(KIND, buffer_id)
        return updated

    def store_result(
        self, buffer_id: str, index: int, result: str, success: bool = True, error: str | None = None
    ) -> bool:
        """Write item ``index``'s outcome unless it has one; True if this was the first.

        One write and no read: what ``system.buffer`` calls per item, since
        reading the whole buffer back after each of 10,000 items would cost
        time quadratic in their number.
        """
        value = _encode_result(result, success, error)
        return self.backend.record_put(KIND, buffer_id, f"{_RESULT}{index}", value, only_if_absent=True)

    def remove(self, buffer_id: str) -> bool:
        return self.backend.record_delete(KIND, buffer_id)

    def list_active(self) -> list[str]:
        return self.backend.record_list(KIND)

    def clear(self) -> None:
        self.backend.record_clear(KIND)


_current: ProcessWide[BufferRegistry] = ProcessWide(BufferRegistry)


def get_buffer_registry() -> BufferRegistry:
    """The process-wide BufferRegistry (the running pump installs its own as this one)."""
    return _current.get()


set_buffer_registry = _current.set


def reset_buffer_registry() -> None:
    """Forget the process-wide registry (tests); its buffers stay in its backend."""
    _current.reset()
