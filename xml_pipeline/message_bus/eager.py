"""Running a coroutine's first step at once, and a task only if it has to wait.

A task per message costs more than a handler that returns without awaiting
(the pump's own collectors of answers do just that). Such a message is handled
within the dispatcher's turn: its coroutine is stepped right there, in a
context of its own as a task would have, and only if it suspends after all
does a task carry it on from where it stopped. That task is told what the
coroutine waits on, so it wakes it when a task would have.

A coroutine stepped here sees the dispatcher as ``asyncio.current_task()``,
so it must not start anything bound to its task (``asyncio.timeout``, a
``TaskGroup``) before its first wait: only the pump's own code runs here.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any


def run_now(work: Coroutine[Any, Any, None], group: asyncio.TaskGroup, name: str) -> None:
    """Run ``work`` until it finishes or first waits; if it waits, a task of ``group`` carries it on."""
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(work.send, None)
    except StopIteration:
        return
    group.create_task(_Carried(work, waiting_on), name=name, context=context)


class _Carried(Coroutine[Any, Any, None]):
    """``work`` as a task runs it from where its first step stopped, waiting on ``waiting_on``.

    A task drives a coroutine by ``send`` and ``throw``: the first ``send``
    hands the task what ``work`` waits on, as ``work`` itself would have;
    every later call goes to ``work``. A cancellation that comes before the
    task's first step is thrown into ``work`` at its wait all the same, so its
    ``except`` and ``finally`` clauses run as they would in a task of its own.
    """

    __slots__ = ("_waiting_on", "_work")

    def __init__(self, work: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._work = work
        self._waiting_on: Any = waiting_on

    def send(self, value: Any) -> Any:
        waiting_on, self._waiting_on = self._waiting_on, None
        if waiting_on is not None:
            return waiting_on
        return self._work.send(value)

    def throw(self, *exc_info: Any) -> Any:
        self._waiting_on = None
        return self._work.throw(*exc_info)

    def close(self) -> None:
        self._work.close()

    def __await__(self) -> Generator[Any, Any, None]:
        value = self.send(None)
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                self.close()
                raise
            except BaseException as exc:
                try:
                    value = self.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = self.send(sent)
                except StopIteration:
                    return
