"""Loops that retry on errors must still stop when they are cancelled.

A cancellation that arrives in the middle of a library call is not always
raised as ``CancelledError``: redis-py's asyncio client, cut off mid-call,
may report the connection it dropped as its own error, or finish the call and
return as if nothing happened. A loop that then goes on would swallow the
request to stop, and a TaskGroup waiting for it would wait forever. Every
retrying loop calls :func:`raise_if_cancelling` in its error handler and
before it waits for the next round.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task has been asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
