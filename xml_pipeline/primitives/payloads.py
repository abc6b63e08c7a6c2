"""The XML contracts of system.sequence and system.buffer.

Payloads that travel inside these (a sequence's input, a buffer's items, the
results) are carried as XML text, so any payload class fits and an item may be
a multi-line document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_DEADLINE_SECONDS = 3600.0


@dataclass(frozen=True)
class SequenceStart:
    """Run ``payload`` through ``steps`` in order; each step's answer is the next step's input."""

    steps: list[str]
    payload: str
    return_to: str = ""
    sequence_id: str = ""
    timeout_seconds: float = 60.0


@dataclass(frozen=True)
class SequenceComplete:
    sequence_id: str
    final_result: str
    step_count: int


@dataclass(frozen=True)
class SequenceError:
    sequence_id: str
    failed_step: str
    step_index: int
    error: str


@dataclass(frozen=True)
class BufferItem:
    """One item's outcome in a BufferComplete, in item order."""

    index: int
    success: bool
    result: str = ""
    error: str = ""


@dataclass(frozen=True)
class BufferStart:
    """Send each of ``items`` (payload XML) to ``target``, at most ``max_in_flight`` at once.

    ``items`` may also be given as one string, one item per non-empty line, as
    the reference design wrote it; it becomes the list, which is what travels.
    """

    target: str
    items: list[str]
    collect: bool = True
    return_to: str = ""
    buffer_id: str = ""
    max_in_flight: int = 100
    timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        items: object = self.items
        if isinstance(items, str):
            object.__setattr__(self, "items", [line.strip() for line in items.splitlines() if line.strip()])


@dataclass(frozen=True)
class BufferComplete:
    buffer_id: str
    total: int
    successful: int
    results: list[BufferItem] = field(default_factory=list)
    timed_out: bool = False


@dataclass(frozen=True)
class BufferDispatched:
    buffer_id: str
    total: int


@dataclass(frozen=True)
class BufferError:
    buffer_id: str
    error: str
