"""The reply watcher: its shared read, driven read by read by a stand-in for Redis, and the waits it serves
without reading (replies written here, news from the inbox)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xml_pipeline.cluster.replies import ReplyWatcher
from xml_pipeline.cluster.store import ClientReply, RepliesRead

REPLY = ClientReply(b"<message/>", "tests.support:Pong", b"<Pong/>")


class Reader:
    async def client_id(self) -> int:
        return 7

    async def aclose(self) -> None:
        pass


class Client:
    def __init__(self, reads: Reads) -> None:
        self._reads = reads

    async def client_unblock(self, client_id: int) -> None:
        self._reads.unblocked.set()


class Reads:
    """Each read the watcher makes waits until the test answers it, as a blocked XREAD would."""

    def __init__(self) -> None:
        self.issued: asyncio.Queue[tuple[dict[str, bytes], asyncio.Future[Any]]] = asyncio.Queue()
        self.inbox_reads: list[bytes | None] = []
        self.blocks_ms: list[int] = []
        self.unblocked = asyncio.Event()
        self.client = Client(self)

    def dedicated_client(self) -> Reader:
        return Reader()

    async def replies_of(
        self, wanted: dict[str, bytes], block_ms: int, reader: Reader, inbox_after: bytes | None = None
    ) -> RepliesRead:
        """Answered by the test with {conversation: entries}, plus "inbox": [conversations] for notices."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.inbox_reads.append(inbox_after)
        self.blocks_ms.append(block_ms)
        await self.issued.put((dict(wanted), answer))
        found = dict(await answer)
        notices = found.pop("inbox", [])
        return RepliesRead(found, notices, b"%d-0" % len(self.inbox_reads) if notices else inbox_after)

    async def next_read(self) -> tuple[dict[str, bytes], asyncio.Future[Any]]:
        async with asyncio.timeout(5):
            return await self.issued.get()


async def test_a_waiter_takes_nothing_from_a_read_issued_before_it_came() -> None:
    """A read issued for an earlier waiter may return entries that waiter collected and deleted meanwhile;
    a later waiter of the same conversation must not get them again."""
    reads = Reads()
    watcher = ReplyWatcher(reads)  # type: ignore[arg-type]
    async with asyncio.TaskGroup() as group:
        running = group.create_task(watcher.run())
        first = group.create_task(watcher.wait("c", b"0", 5))
        wanted, answer = await reads.next_read()
        assert wanted == {"c": b"0"}
        answer.set_result({"c": [(b"1-0", REPLY)]})
        assert await first == [(b"1-0", REPLY)]

        stale_wanted, stale = await reads.next_read()  # issued before the first waiter's collect deleted 1-0
        assert stale_wanted == {"c": b"0"}
        second = group.create_task(watcher.wait("c", b"0", 5))
        async with asyncio.timeout(5):
            await reads.unblocked.wait()  # the second waiter interrupts the read in progress
        stale.set_result({"c": [(b"1-0", REPLY)]})
        fresh_wanted, fresh = await reads.next_read()
        assert fresh_wanted == {"c": b"0"}
        fresh.set_result({"c": [(b"2-0", None)]})
        assert await second == [(b"2-0", None)]
        running.cancel()


REPLY_AND_END = [(b"5-0", REPLY), (b"5-0", None)]


@pytest.fixture
async def home() -> Any:
    """A watcher whose daemon's inbox is open, running on the stand-in."""
    reads = Reads()
    watcher = ReplyWatcher(reads, home_grace_seconds=30)  # type: ignore[arg-type]
    watcher.inbox_opened(b"0-1")
    async with asyncio.TaskGroup() as group:
        running = group.create_task(watcher.run())
        yield reads, watcher, group
        watcher.stop_waiting()
        running.cancel()


async def test_a_wait_for_a_conversation_opened_here_takes_what_a_commit_here_wrote_without_reading_it(
    home: Any,
) -> None:
    reads, watcher, group = home
    waiting = group.create_task(watcher.wait("c", b"0", 5, home=True))
    wanted, answer = await reads.next_read()
    assert wanted == {}  # only the inbox is read: the conversation's news will come here
    assert reads.inbox_reads[-1] == b"0-1"
    assert watcher.delivered("c", REPLY_AND_END, whole=True) is False  # nobody needs a read
    assert await waiting == REPLY_AND_END
    answer.set_result({})


async def test_a_commit_here_that_is_not_all_of_the_stream_makes_its_waiters_read(home: Any) -> None:
    reads, watcher, group = home
    waiting = group.create_task(watcher.wait("c", b"3-0", 5, home=True))
    _, first = await reads.next_read()
    assert watcher.delivered("c", REPLY_AND_END, whole=False) is True  # the caller nudges
    await watcher.nudge()
    async with asyncio.timeout(5):
        await reads.unblocked.wait()
    first.set_result({})
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"3-0"}
    answer.set_result({"c": [(b"4-0", REPLY), *REPLY_AND_END]})
    assert await waiting == [(b"4-0", REPLY), *REPLY_AND_END]


async def test_news_from_another_daemon_in_the_inbox_makes_the_waiter_read(home: Any) -> None:
    reads, watcher, group = home
    waiting = group.create_task(watcher.wait("c", b"0", 5, home=True))
    wanted, answer = await reads.next_read()
    assert wanted == {}
    answer.set_result({"inbox": ["c"]})
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"0"}
    assert reads.inbox_reads[-1] == b"1-0"  # the inbox is read on from its last notice
    answer.set_result({"c": REPLY_AND_END})
    assert await waiting == REPLY_AND_END


async def test_news_that_came_before_anyone_waited_is_read_at_once(home: Any) -> None:
    reads, watcher, group = home
    assert watcher.delivered("c", REPLY_AND_END, whole=True) is False  # nobody waits: remembered as stirred
    waiting = group.create_task(watcher.wait("c", b"0", 5, home=True))
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"0"}
    answer.set_result({"c": REPLY_AND_END})
    assert await waiting == REPLY_AND_END


async def test_a_wait_for_a_conversation_opened_elsewhere_is_read_at_once(home: Any) -> None:
    reads, watcher, group = home
    waiting = group.create_task(watcher.wait("c", b"0", 5))
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"0"}
    answer.set_result({"c": REPLY_AND_END})
    assert await waiting == REPLY_AND_END


async def test_a_home_wait_that_hears_nothing_reads_after_its_grace() -> None:
    """A notice that never comes (the client continued its conversation on another daemon, the inbox
    expired, an older daemon wrote the reply) costs the grace, and loses nothing."""
    reads = Reads()
    watcher = ReplyWatcher(reads, home_grace_seconds=0.05)  # type: ignore[arg-type]
    watcher.inbox_opened(b"0-1")
    async with asyncio.TaskGroup() as group:
        running = group.create_task(watcher.run())
        waiting = group.create_task(watcher.wait("c", b"0", 5, home=True))
        wanted, answer = await reads.next_read()
        assert wanted == {}
        assert reads.blocks_ms[-1] <= 51  # the read blocks no longer than the waiter's grace
        while not wanted:  # as Redis would answer: nothing came within the block
            await asyncio.sleep(reads.blocks_ms[-1] / 1000)
            answer.set_result({})
            wanted, answer = await reads.next_read()
        assert wanted == {"c": b"0"}
        answer.set_result({"c": REPLY_AND_END})
        assert await waiting == REPLY_AND_END
        running.cancel()


async def test_an_inbox_made_again_may_have_missed_news_so_every_waiter_reads(home: Any) -> None:
    reads, watcher, group = home
    waiting = group.create_task(watcher.wait("c", b"0", 5, home=True))
    wanted, answer = await reads.next_read()
    assert wanted == {}
    watcher.inbox_opened(b"9-0")
    answer.set_result({})
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"0"}
    assert reads.inbox_reads[-1] == b"9-0"
    answer.set_result({"c": REPLY_AND_END})
    assert await waiting == REPLY_AND_END


async def test_news_a_waiter_was_told_of_outlives_an_answer_that_does_not_hold_it(home: Any) -> None:
    """Several replies in one conversation, the first from another daemon, the second from this one.

    The inbox's notice makes the waiter read; that read answers the first reply
    only, while this daemon's commit of the second (not all of the stream) tells
    the waiter to read, too late for the read in progress. The client's next
    wait must read at once: nothing else will tell it of the second reply, which
    otherwise waits for the grace (here 30 s; in a daemon one second per such reply).
    """
    reads, watcher, group = home
    waiting = group.create_task(watcher.wait("c", b"0", 5, home=True))
    wanted, answer = await reads.next_read()
    assert wanted == {}
    answer.set_result({"inbox": ["c"]})  # another daemon wrote 1-0
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"0"}  # issued before this daemon wrote 2-0
    assert watcher.delivered("c", [(b"2-0", REPLY)], whole=False) is True
    await watcher.nudge()
    answer.set_result({"c": [(b"1-0", REPLY)]})
    assert await waiting == [(b"1-0", REPLY)]

    again = group.create_task(watcher.wait("c", b"1-0", 5, home=True))
    wanted, answer = await reads.next_read()
    if wanted == {"c": b"0"}:  # issued for the first waiter, before the second came: not the second's
        answer.set_result({"c": [(b"1-0", REPLY), (b"2-0", REPLY)]})
        wanted, answer = await reads.next_read()
    assert wanted == {"c": b"1-0"}  # read at once: 2-0 is in Redis, and no news of it will come again
    answer.set_result({"c": [(b"2-0", REPLY)]})
    assert await again == [(b"2-0", REPLY)]


async def test_a_read_for_two_waiters_of_a_conversation_starts_after_the_earlier_entry(home: Any) -> None:
    """Two waits of one conversation (a client's collect retried while its first still waits) read from the
    earlier of their ids: 7-9 comes before 7-10, although b"7-10" < b"7-9" as bytes."""
    reads, watcher, group = home
    later = group.create_task(watcher.wait("c", b"7-10", 5))
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"7-10"}
    earlier = group.create_task(watcher.wait("c", b"7-9", 5))
    async with asyncio.timeout(5):
        await reads.unblocked.wait()
    answer.set_result({})
    wanted, answer = await reads.next_read()
    assert wanted == {"c": b"7-9"}
    answer.set_result({"c": [(b"7-10", REPLY), (b"7-11", REPLY)]})
    assert await earlier == [(b"7-10", REPLY), (b"7-11", REPLY)]
    assert await later == [(b"7-11", REPLY)]
