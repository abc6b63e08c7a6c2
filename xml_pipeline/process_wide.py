"""One instance of a thing per process, which the running pump may replace.

Handlers reach the thread registry, the context buffer and the orchestration
registries through module-level ``get_…()`` functions, wherever they run (in the
daemon or in a worker process). Each module keeps its instance in one of these
holders: made on first use, replaced by ``set``, forgotten by ``reset`` (tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessWide(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self, make: Callable[[], T] | None = None) -> T:
        """The installed instance, or one made now by ``make`` (the default maker if None).

        Made under a lock, so threads that ask at once all get the same instance.
        """
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = (make or self._make)()
                value = self._value
        return value

    def set(self, value: T) -> None:
        self._value = value

    def reset(self) -> None:
        self._value = None
