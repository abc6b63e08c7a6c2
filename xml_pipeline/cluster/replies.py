"""Waiting for replies without a Redis connection per waiter.

Clients wait for their conversation's replies (``wait=end``), and a buffer's
run waits for each of its items' answers: thousands of waits at once. A
blocking read each would take a connection each. Instead one task reads every
awaited reply stream in a single blocking ``XREAD`` (re-issued every
``BLOCK_SECONDS``, so a new waiter is included within that time) and hands
each entry to whoever waits for that conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from xml_pipeline.cluster.store import ClientReply, ClusterStore

log = logging.getLogger("xml_pipeline.cluster")

BLOCK_SECONDS = 0.1
MAX_STREAMS_PER_READ = 1000

Entry = tuple[bytes, ClientReply | None]


@dataclass(eq=False, slots=True)
class _Waiter:
    conversation: str
    after: bytes
    arrived: asyncio.Future[list[Entry]]


class ReplyWatcher:
    def __init__(self, store: ClusterStore) -> None:
        self._store = store
        self._waiters: dict[str, list[_Waiter]] = {}
        self._someone_waits = asyncio.Event()

    async def wait(self, conversation: str, after: bytes, timeout: float) -> list[Entry]:
        """Entries of ``conversation``'s reply stream after ``after``; [] if none came within ``timeout``."""
        waiter = _Waiter(conversation, after, asyncio.get_running_loop().create_future())
        self._waiters.setdefault(conversation, []).append(waiter)
        self._someone_waits.set()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.arrived
        except TimeoutError:
            return []
        finally:
            waiting = self._waiters.get(conversation, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(conversation, None)

    async def run(self) -> None:
        """Read for every waiter until cancelled (the engine runs this in its task group)."""
        while True:
            if not self._waiters:
                self._someone_waits.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._someone_waits.wait()
                continue
            wanted = {
                conversation: min(waiter.after for waiter in waiters)
                for conversation, waiters in list(self._waiters.items())[:MAX_STREAMS_PER_READ]
            }
            try:
                found = await self._store.replies_of(wanted, int(BLOCK_SECONDS * 1000))
            except (RedisError, OSError) as exc:
                log.warning("reading replies failed, trying again: %s", exc)
                await asyncio.sleep(BLOCK_SECONDS)
                continue
            for conversation, entries in found.items():
                for waiter in self._waiters.get(conversation, []):
                    mine = [entry for entry in entries if _after(entry[0], waiter.after)]
                    if mine and not waiter.arrived.done():
                        waiter.arrived.set_result(mine)


def _after(entry_id: bytes, after: bytes) -> bool:
    def key(value: bytes) -> tuple[int, int]:
        milliseconds, _, sequence = value.partition(b"-")
        return int(milliseconds), int(sequence or 0)

    return key(entry_id) > key(after)
