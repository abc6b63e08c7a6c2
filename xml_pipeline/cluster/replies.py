"""Waiting for replies without a Redis connection per waiter.

Clients wait for their conversation's replies (``wait=end``), and a buffer's
run waits for each of its items' answers: thousands of waits at once. A
blocking read each would take a connection each. Instead one task reads every
awaited reply stream in a single blocking ``XREAD`` on a connection of its own
and hands each entry to whoever waits for that conversation. A new waiter
interrupts the read in progress (``CLIENT UNBLOCK``), so the next read includes
its stream at once rather than after the block runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from xml_pipeline.cancelling import raise_if_cancelling
from xml_pipeline.cluster.store import ClientReply, ClusterStore

log = logging.getLogger("xml_pipeline.cluster")

BLOCK_SECONDS = 1.0
MAX_STREAMS_PER_READ = 1000

Entry = tuple[bytes, ClientReply | None]


@dataclass(eq=False, slots=True)
class _Waiter:
    conversation: str
    after: bytes
    arrived: asyncio.Future[list[Entry]]
    first_read: int
    """The first read this waiter may take entries from: one issued after it came. An earlier read (issued
    for an earlier waiter of the same conversation) may hold entries collected and deleted since."""


class ReplyWatcher:
    def __init__(self, store: ClusterStore) -> None:
        self._store = store
        self._waiters: dict[str, list[_Waiter]] = {}
        self._someone_waits = asyncio.Event()
        self._reader = store.dedicated_client()
        self._reader_id: int | None = None
        self._reading = False
        self._nudged = False
        self._stopped = False
        self._window = 0
        self._reads = 0
        """Reads issued so far; the number of the read in progress, if one is."""
        """Which window of the awaited streams the next read covers, when one read cannot cover them all."""

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop_waiting(self) -> None:
        """The daemon is stopping: every wait ends now with what it has, and later ones at once.

        Its clients hear what came so far (their conversation not yet ended),
        instead of a connection dropped with the daemon; the rest stays in
        Redis for them to collect from another daemon.
        """
        self._stopped = True
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.arrived.done():
                    waiter.arrived.set_result([])

    async def wait(self, conversation: str, after: bytes, timeout: float) -> list[Entry]:
        """Entries of ``conversation``'s reply stream after ``after``; [] if none came within ``timeout``."""
        if self._stopped:
            return []
        waiter = _Waiter(conversation, after, asyncio.get_running_loop().create_future(), self._reads + 1)
        self._waiters.setdefault(conversation, []).append(waiter)
        self._someone_waits.set()
        await self._nudge()
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

    async def _nudge(self) -> None:
        """Interrupt the read in progress (once per read), so that it starts again with the new stream."""
        if not self._reading or self._nudged or self._reader_id is None:
            return
        self._nudged = True
        try:
            await self._store.client.client_unblock(self._reader_id)
        except (RedisError, OSError) as exc:  # the read then ends by itself within BLOCK_SECONDS
            log.debug("could not interrupt the reply read: %s", exc)

    async def close(self) -> None:
        await self._reader.aclose()

    async def run(self) -> None:
        """Read for every waiter until cancelled (the engine runs this in its task group)."""
        while True:
            raise_if_cancelling()
            if not self._waiters:
                self._someone_waits.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._someone_waits.wait()
                continue
            # More awaited streams than one read covers: each read takes the next window of them, and blocks
            # for its share of BLOCK_SECONDS, so every waiter is read within about BLOCK_SECONDS.
            conversations = list(self._waiters)
            windows = -(-len(conversations) // MAX_STREAMS_PER_READ)
            start = self._window % windows * MAX_STREAMS_PER_READ
            self._window += 1
            wanted = {
                conversation: min(waiter.after for waiter in self._waiters[conversation])
                for conversation in conversations[start : start + MAX_STREAMS_PER_READ]
            }
            block_ms = max(10, int(BLOCK_SECONDS * 1000 / windows))
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                self._reading, self._nudged = True, False
                self._reads += 1
                read = self._reads
                found = await self._store.replies_of(wanted, block_ms, self._reader)
            except (RedisError, OSError) as exc:
                raise_if_cancelling()
                log.warning("reading replies failed, trying again: %s", exc)
                self._reader_id = None  # a new connection has a new id
                await asyncio.sleep(BLOCK_SECONDS / 10)
                continue
            finally:
                self._reading = False
            for conversation, entries in found.items():
                for waiter in self._waiters.get(conversation, []):
                    if waiter.first_read > read:
                        continue  # it came after this read was issued: the next read is its own
                    mine = [entry for entry in entries if _after(entry[0], waiter.after)]
                    if mine and not waiter.arrived.done():
                        waiter.arrived.set_result(mine)


def _after(entry_id: bytes, after: bytes) -> bool:
    def key(value: bytes) -> tuple[int, int]:
        milliseconds, _, sequence = value.partition(b"-")
        return int(milliseconds), int(sequence or 0)

    return key(entry_id) > key(after)
