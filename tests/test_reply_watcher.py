"""The reply watcher's shared read, driven read by read by a stand-in for Redis."""

from __future__ import annotations

import asyncio
from typing import Any

from xml_pipeline.cluster.replies import ReplyWatcher
from xml_pipeline.cluster.store import ClientReply

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
        self.unblocked = asyncio.Event()
        self.client = Client(self)

    def dedicated_client(self) -> Reader:
        return Reader()

    async def replies_of(self, wanted: dict[str, bytes], block_ms: int, reader: Reader) -> Any:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.issued.put((dict(wanted), answer))
        return await answer

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
