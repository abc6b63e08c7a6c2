"""Waiting for replies without a Redis connection per waiter, and mostly without reading at all.

Clients wait for their conversation's replies (``wait=end``), and a buffer's
run waits for each of its items' answers: thousands of waits at once. Where
the replies come from decides how a wait is served:

- **Written here.** A step this daemon commits hands the reply entries it
  wrote straight to the waiters of their conversation (:meth:`delivered`),
  when they are all its reply stream holds; otherwise it tells them to read.
  Most conversations are answered by the daemon that opened them (always, on
  a single daemon), and then nothing is read back from Redis.
- **Written by another daemon** for a conversation this one opened: the
  commit also notes the conversation in this daemon's *inbox* stream, which
  every read here includes; the notice makes its waiters read.
- **Any other conversation** (opened elsewhere, or forgotten here): its
  waiters are read at once, as every waiter was before inboxes.
- **Never written.** When a client waits here for the end of a conversation
  opened here, the step that ends it hands its replies and end straight to
  the waiter and stores nothing (:meth:`awaited_to_end`, :meth:`hand_over`):
  they are collected the moment they exist. Their ids are below any stream's
  (``0-1``, ``0-2``...; see :func:`handed`), so the collector knows there is
  nothing in Redis to delete.

One task reads every awaited reply stream and the inbox in a single blocking
``XREAD`` on a connection of its own. A waiter that must be read at once
interrupts the read in progress (``CLIENT UNBLOCK``), so the next read
includes its stream. A waiter that expects news (its conversation opened
here) joins the reads by itself after ``home_grace_seconds``, so a notice
that never comes (the client continued its conversation on another daemon,
the inbox expired, a daemon of an older version wrote the reply) costs that
much time and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from xml_pipeline.cancelling import raise_if_cancelling
from xml_pipeline.cluster.store import ClientReply, ClusterStore

log = logging.getLogger("xml_pipeline.cluster")

BLOCK_SECONDS = 1.0
MAX_STREAMS_PER_READ = 1000
HOME_GRACE_SECONDS = 1.0
"""How long a wait for a conversation opened here relies on being told of news before it reads anyway."""
STIRRED_REMEMBERED = 65_536
"""Conversations opened here remembered at most as having news nobody waited for yet; the wait for a forgotten
one relies on news to come, and reads after its grace."""

Entry = tuple[bytes, ClientReply | None]


@dataclass(eq=False, slots=True)
class _Waiter:
    conversation: str
    after: bytes
    arrived: asyncio.Future[list[Entry]]
    first_read: int
    """The first read this waiter may take entries from: one issued after it came. An earlier read (issued
    for an earlier waiter of the same conversation) may hold entries collected and deleted since."""
    joins_at: float
    """When its stream joins the reads (monotonic seconds; 0: at once)."""
    told: int = 0
    """The first read that holds the news it was told of (0: none): an answer from an earlier read, or handed
    over by a commit, may not hold that news, which then must outlive this waiter (its next wait reads)."""
    answered_by: int = 0
    """The read that answered it (0: none, or a commit here)."""
    until_end: bool = False
    """It takes every reply until the end (a collect with ``wait=end``), so the end may be handed to it."""


class ReplyWatcher:
    def __init__(self, store: ClusterStore, *, home_grace_seconds: float = HOME_GRACE_SECONDS) -> None:
        self._store = store
        self._home_grace = home_grace_seconds
        self._waiters: dict[str, list[_Waiter]] = {}
        self._someone_waits = asyncio.Event()
        self._reader = store.dedicated_client()
        self._reader_id: int | None = None
        self._reading = False
        self._nudged = False
        self._stopped = False
        self._window = 0
        """Which window of the awaited streams the next read covers, when one read cannot cover them all."""
        self._reads = 0
        """Reads issued so far; the number of the read in progress, if one is."""
        self._inbox_after: bytes | None = None
        """Where the next read of this daemon's inbox starts; None until it is open (then nobody expects news)."""
        self._inbox_opened = 0
        """How often the inbox was opened: a read issued before the latest opening must not move where it is read."""
        self._stirred: OrderedDict[str, None] = OrderedDict()
        """Conversations that had news while nobody here waited for them: their next waiter reads at once."""

    @property
    def stopped(self) -> bool:
        return self._stopped

    def inbox_opened(self, after: bytes) -> None:
        """This daemon's inbox exists (again), read from after ``after``: waits may expect news.

        Opened again after it expired, it may have missed notices: every
        waiter reads at once, as it would have after its grace.
        """
        missed = self._inbox_after is not None
        self._inbox_after = after
        self._inbox_opened += 1
        if missed:
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.joins_at = 0.0
            self._someone_waits.set()

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

    async def wait(
        self, conversation: str, after: bytes, timeout: float, *, home: bool = False, until_end: bool = False
    ) -> list[Entry]:
        """Entries of ``conversation``'s reply stream after ``after``; [] if none came within ``timeout``.

        ``home``: the conversation was opened here, so its news reaches this
        daemon (a commit here, or a notice in its inbox) and its stream need
        not be read until then. ``until_end``: the caller takes every reply
        until the end, which may then be handed to it without being stored.
        """
        if self._stopped:
            return []
        stirred = conversation in self._stirred
        if stirred:
            del self._stirred[conversation]
        expects_news = home and self._inbox_after is not None and not stirred
        joins_at = time.monotonic() + self._home_grace if expects_news else 0.0
        arrived = asyncio.get_running_loop().create_future()
        waiter = _Waiter(conversation, after, arrived, self._reads + 1, joins_at, until_end=until_end)
        self._waiters.setdefault(conversation, []).append(waiter)
        self._someone_waits.set()
        if not expects_news:
            await self.nudge()
        expiry = asyncio.get_running_loop().call_later(timeout, _answer_nothing, waiter.arrived)
        try:
            return await waiter.arrived
        finally:
            expiry.cancel()
            if waiter.told > waiter.answered_by:  # told of news its answer may not hold: the next wait reads
                self._stir(conversation)
            waiting = self._waiters.get(conversation, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(conversation, None)

    def awaited_to_end(self, conversation: str) -> bool:
        """Whether a waiter here takes every reply of ``conversation`` until its end (a commit may hand them over)."""
        return any(waiter.until_end for waiter in self._pending(conversation))

    def hand_over(self, conversation: str, entries: Sequence[Entry]) -> bool:
        """A step committed here ended ``conversation`` and stored nothing: ``entries`` (all of its replies and
        the end, with :func:`handed` ids) go to its waiters. False if no waiter takes them to the end any more
        (its wait timed out, or was cancelled, during the commit): the caller must store them after all."""
        waiting = self._pending(conversation)
        if not any(waiter.until_end for waiter in waiting):
            return False
        for waiter in waiting:
            _answer(waiter, entries)
        return True

    def delivered(self, conversation: str, entries: Sequence[Entry], *, whole: bool, home: bool = True) -> bool:
        """A step committed here wrote ``entries`` to ``conversation``'s reply stream.

        ``whole``: the stream held nothing before them, so a waiter may take
        them as if it had read them. Otherwise its waiters must read. Returns
        whether a waiter had to be told to read (the caller then :meth:`nudge`s).
        ``home``: the conversation was opened here. Only then is news that
        nobody waits for yet remembered (a wait for any other reads at once).
        """
        if whole:
            waiting = self._pending(conversation)
            if not waiting and home:
                self._stir(conversation)  # its next waiter reads at once
            for waiter in waiting:
                _answer(waiter, entries)
            return False
        return self._told(conversation, self._reads + 1, home)  # a read issued from now on holds the entries

    def _told(self, conversation: str, holding: int, home: bool = True) -> bool:
        """``conversation`` has news that read number ``holding`` and later ones hold: its waiters read;
        nobody waits: its next waiter reads at once. Whether a waiter was told."""
        waiting = self._pending(conversation)
        if not waiting:
            if home:
                self._stir(conversation)
            return False
        for waiter in waiting:
            waiter.joins_at = 0.0
            waiter.told = max(waiter.told, holding)
        return True

    def _pending(self, conversation: str) -> list[_Waiter]:
        """``conversation``'s waiters not answered yet."""
        return [waiter for waiter in self._waiters.get(conversation, ()) if not waiter.arrived.done()]

    def _stir(self, conversation: str) -> None:
        self._stirred[conversation] = None
        self._stirred.move_to_end(conversation)
        while len(self._stirred) > STIRRED_REMEMBERED:
            self._stirred.popitem(last=False)

    async def nudge(self) -> None:
        """Interrupt the read in progress (once per read), so that it starts again with the new streams: waiters
        were told to read, or joined, and should not wait for the read in progress to end."""
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
            now = time.monotonic() + 0.002  # a read sized to end at a waiter's grace may wake a little early
            included: list[str] = []
            next_join = now + BLOCK_SECONDS
            for conversation, waiters in self._waiters.items():
                joins_at = min(waiter.joins_at for waiter in waiters)
                if joins_at <= now:
                    included.append(conversation)
                else:
                    next_join = min(next_join, joins_at)
            # More awaited streams than one read covers: each read takes the next window of them, and blocks
            # for its share of BLOCK_SECONDS, so every waiter is read within about BLOCK_SECONDS.
            windows = max(1, -(-len(included) // MAX_STREAMS_PER_READ))
            start = self._window % windows * MAX_STREAMS_PER_READ
            self._window += 1
            wanted = {
                conversation: min((waiter.after for waiter in self._waiters[conversation]), key=_id_key)
                for conversation in included[start : start + MAX_STREAMS_PER_READ]
            }
            block_ms = max(10, min(int(BLOCK_SECONDS * 1000 / windows), int((next_join - now) * 1000) + 1))
            if not wanted and self._inbox_after is None:  # nothing to read until a waiter joins
                await asyncio.sleep(block_ms / 1000)
                continue
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                self._reading, self._nudged = True, False
                self._reads += 1
                read, opened = self._reads, self._inbox_opened
                found = await self._store.replies_of(wanted, block_ms, self._reader, self._inbox_after)
            except (RedisError, OSError) as exc:
                raise_if_cancelling()
                log.warning("reading replies failed, trying again: %s", exc)
                self._reader_id = None  # a new connection has a new id
                await asyncio.sleep(BLOCK_SECONDS / 10)
                continue
            finally:
                self._reading = False
            if opened == self._inbox_opened:
                self._inbox_after = found.inbox_after
            for conversation in found.notices:
                # its waiters join the next read, which is now; this read holds the reply too if it read the
                # stream (the commit wrote the reply and the notice at once)
                self._told(conversation, read if conversation in wanted else read + 1)
            for conversation, entries in found.replies.items():
                for waiter in self._waiters.get(conversation, []):
                    if waiter.first_read > read:
                        continue  # it came after this read was issued: the next read is its own
                    if not waiter.arrived.done() and _answer(waiter, entries):
                        waiter.answered_by = read


def handed(count: int) -> list[bytes]:
    """Ids for ``count`` entries handed over without being stored: below every stream entry's id, and above the
    ``after`` of a wait that has seen nothing."""
    return [b"0-%d" % number for number in range(1, count + 1)]


def was_handed(entry_id: bytes) -> bool:
    return entry_id.startswith(b"0-")


def _answer(waiter: _Waiter, entries: Sequence[Entry]) -> bool:
    """Answer ``waiter`` (not answered yet) with the entries it has not seen; whether there were any."""
    mine = [entry for entry in entries if _after(entry[0], waiter.after)]
    if mine:
        waiter.arrived.set_result(mine)
    return bool(mine)


def _answer_nothing(arrived: asyncio.Future[list[Entry]]) -> None:
    """A wait's timeout: it ends with nothing (one timer handle, cheaper than an ``asyncio.timeout``)."""
    if not arrived.done():
        arrived.set_result([])


def _id_key(value: bytes) -> tuple[int, int]:
    """A stream entry id as it orders: numbers, not bytes (b"7-10" comes after b"7-9")."""
    milliseconds, _, sequence = value.partition(b"-")
    return int(milliseconds), int(sequence or 0)


def _after(entry_id: bytes, after: bytes) -> bool:
    return _id_key(entry_id) > _id_key(after)
