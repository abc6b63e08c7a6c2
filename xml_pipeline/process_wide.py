"""One instance of a thing per process, which the running pump may replace.

Handlers reach the thread registry, the context buffer and the orchestration
registries through module-level ``get_…()`` functions, wherever they run (in the
daemon or in a worker process). Each module keeps its instance in one of these
holders: made on first use, replaced by ``set``, forgotten by ``reset`` (tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessWide(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: T | None = None

    def get(self) -> T:
        """The installed instance, or a default one made now."""
        if self._value is None:
            self._value = self._make()
        return self._value

    def set(self, value: T) -> None:
        self._value = value

    def reset(self) -> None:
        self._value = None
