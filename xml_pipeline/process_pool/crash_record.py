"""Payloads that crashed worker processes, so that one which crashes every time is refused.

A worker crash costs more than the call that caused it: the executor breaks,
every other call in it is run again, and new workers are spawned. A caller
retrying a payload that always kills its worker (``worker-crash`` allows a
retry) would keep the pool in that state. So the pool counts, per payload (the
same handler and the same payload XML), the crashes in a row, and refuses the
payload once it has crashed MAX_CRASHES workers. A payload that completes
normally is forgotten. The record is bounded: the least recently crashed
payloads are forgotten first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from xml_pipeline.process_pool.worker import Task

MAX_CRASHES = 3
"""Crashes in a row after which a payload is refused without running."""

REMEMBERED_PAYLOADS = 1024
"""How many crashing payloads the record keeps, most recent first."""


def _fingerprint(task: Task) -> bytes:
    digest = hashlib.sha256()
    for part in (task.handler_path.encode(), task.payload_type.encode(), task.payload_xml):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


class CrashRecord:
    def __init__(self, *, max_crashes: int = MAX_CRASHES, remembered: int = REMEMBERED_PAYLOADS) -> None:
        self.max_crashes = max_crashes
        self._remembered = remembered
        self._crashes: OrderedDict[bytes, int] = OrderedDict()

    def refuses(self, task: Task) -> bool:
        return self.crashes(task) >= self.max_crashes

    def crashes(self, task: Task) -> int:
        return self._crashes.get(_fingerprint(task), 0)

    def count_crash(self, task: Task) -> int:
        """Note that ``task`` was running in a worker that died; return its crashes in a row."""
        key = _fingerprint(task)
        crashes = self._crashes.pop(key, 0) + 1
        self._crashes[key] = crashes
        while len(self._crashes) > self._remembered:
            self._crashes.popitem(last=False)
        return crashes

    def forget(self, task: Task) -> None:
        """``task`` completed in a worker: whatever crashed before was not the payload alone."""
        if self._crashes:
            self._crashes.pop(_fingerprint(task), None)
