"""Which worker process started which call: the pool's only way to tell, after a crash, whose call it was.

When one worker dies, a ProcessPoolExecutor fails every call it holds with the
same BrokenProcessPool, whichever worker ran it and whether it ran at all. So
each call handed to the executor takes a slot and a fresh hand-over number,
and the worker that starts it writes the number and its own pid into the
slot's cell of an array in shared memory before it runs the handler. One
64-bit cell holds both, so the write is a single store and needs no lock; the
number makes a late write for an earlier hand-over of the slot (a call its
caller gave up on, still queued in the executor) read as "not started".
"""

from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import os

NOT_STARTED = 0

_PID_BITS = 32
_PID_MASK = (1 << _PID_BITS) - 1
_HAND_OVER_MASK = (1 << 30) - 1  # keeps the packed cell positive in a signed 64-bit integer


class StartMarks:
    """One cell per slot: who started the slot's latest hand-over.

    Reaches the workers through the executor's initializer arguments (shared
    memory can only be handed over while a process is being spawned).
    """

    def __init__(self, slots: int) -> None:
        self._cells = multiprocessing.get_context("spawn").RawArray(ctypes.c_int64, slots)
        self._hand_overs = itertools.count(1)

    def next_hand_over(self) -> int:
        """A number for the next hand-over of a call to the executor (parent side)."""
        return next(self._hand_overs) & _HAND_OVER_MASK or 1

    def mark_started_here(self, slot: int, hand_over: int) -> None:
        """In the worker, before the handler runs."""
        self._cells[slot] = hand_over << _PID_BITS | os.getpid()

    def started_in(self, slot: int, hand_over: int) -> int:
        """The pid of the worker that started this hand-over of the slot's call, or NOT_STARTED."""
        cell = self._cells[slot]
        return cell & _PID_MASK if cell >> _PID_BITS == hand_over else NOT_STARTED
