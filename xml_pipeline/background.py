"""Work an engine runs beside its messages (a buffer answered with collect: false, say).

It runs in the engine's task group, so it ends with the engine, and whatever
becomes of it is logged: stopped with the engine, or failed with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


def run_guarded(group: asyncio.TaskGroup, work: Coroutine[Any, Any, object], name: str, log: logging.Logger) -> None:
    async def guarded() -> None:
        try:
            await work
        except asyncio.CancelledError:
            log.warning("background work %s was stopped with its engine", name)
            raise
        except Exception:
            log.exception("background work %s failed", name)

    group.create_task(guarded(), name=name)
