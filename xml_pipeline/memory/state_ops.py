"""The writes the pump makes on every hop, as values a backend can run in bulk.

A message costs the pump a few writes to shared state: register its thread,
append it to the conversation's history, and at the end forget both. Run one
by one against Redis or a manager, each is a network round trip and the round
trips, not the work, set the pace. Described as values instead, the writes of
many messages can be handed to :meth:`SharedBackend.apply` together and cross
the network once (see :mod:`xml_pipeline.memory.state_batcher`).

Each op means exactly what the backend method of the same purpose does; the
result of an op is what that method returns, or the exception it raises,
returned in its place so one failing op cannot hide the others' outcomes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# Immutable tuples rather than frozen dataclasses: several ops are made for every message, and a tuple is made
# in half the time (a frozen dataclass sets each field through ``object.__setattr__``). Equality still tells the
# kinds apart (``ForgetThread("t") != DeleteHistory("t")``), as it did between the dataclasses.


def _same_op(self: tuple[Any, ...], other: object) -> bool:
    return type(self) is type(other) and tuple.__eq__(self, other)


def _other_op(self: tuple[Any, ...], other: object) -> bool:
    return not _same_op(self, other)


class RegisterThread(NamedTuple):
    """``registry_set(chain, uuid)``"""

    chain: str
    uuid: str


class AppendSlot(NamedTuple):
    """``buffer_append(thread_id, slot, max_slots=..., max_threads=...)``: the result is the slot's index.

    A cap of None means no cap, as when ``buffer_append`` is called without one.
    """

    thread_id: str
    slot: bytes
    max_slots: int | None
    max_threads: int | None


class ForgetThread(NamedTuple):
    """``registry_delete(uuid)``"""

    uuid: str


class DeleteHistory(NamedTuple):
    """``buffer_delete_thread(thread_id)``"""

    thread_id: str


StateOp = RegisterThread | AppendSlot | ForgetThread | DeleteHistory

for _kind in (RegisterThread, AppendSlot, ForgetThread, DeleteHistory):
    _kind.__eq__ = _same_op  # type: ignore[method-assign]
    _kind.__ne__ = _other_op  # type: ignore[assignment,method-assign]
    _kind.__hash__ = tuple.__hash__  # type: ignore[method-assign]
del _kind
