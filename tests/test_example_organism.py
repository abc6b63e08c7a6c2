"""The example organism end to end: console -> greeter -> shouter -> exclaimer and back."""

from __future__ import annotations

from tests.conftest import HistoryLog
from workers.hello import Exclaim, Exclaimed, Greeting, GreetingReply, Shouted, ShoutRequest
from xml_pipeline.message.safe_xml import parse_untrusted
from xml_pipeline.organism import Organism
from xml_pipeline.testing import ask, running


async def test_reply_travels_back_to_the_caller_on_its_thread(
    example_organism: Organism, history_log: HistoryLog
) -> None:
    async with running(example_organism, on_conversation_end=history_log) as pump:
        submission = await pump.inject_payload(Greeting("world", 2), "greeter")
        reply = await submission.next_reply(5)
        rest = await submission.collect(5)

    assert reply.payload == GreetingReply("HELLO, WORLD!!")
    assert (reply.sender, reply.to, reply.thread) == ("greeter", "console", submission.thread_id)
    assert rest == []
    envelope = parse_untrusted(reply.envelope)
    assert envelope.findtext("{*}meta/{*}thread") == submission.thread_id


async def test_context_buffer_holds_each_hop_once_in_order(example_organism: Organism, history_log: HistoryLog) -> None:
    async with running(example_organism, on_conversation_end=history_log) as pump:
        submission = await pump.inject_payload(Greeting("Ada"), "greeter")
        await submission.collect(5)

    history = history_log.conversations[submission.thread_id]
    hops = [(slot.from_id, slot.to_id, slot.payload) for slot in history]
    assert hops == [
        ("console", "greeter", Greeting("Ada")),
        ("greeter", "shouter", ShoutRequest("hello, Ada")),
        ("shouter", "exclaimer", Exclaim("HELLO, ADA")),
        ("exclaimer", "shouter", Exclaimed("HELLO, ADA!")),
        ("shouter", "greeter", Shouted("HELLO, ADA!")),
        ("greeter", "console", GreetingReply("HELLO, ADA!")),
    ]
    assert [slot.index for slot in history] == list(range(6))
    # responses travel on the caller's thread: each (listener, thread) pairing is consistent
    by_hop = {(slot.from_id, slot.to_id): slot.hop_thread for slot in history}
    assert by_hop[("console", "greeter")] == by_hop[("shouter", "greeter")]
    assert by_hop[("greeter", "shouter")] == by_hop[("exclaimer", "shouter")]
    assert by_hop[("greeter", "console")] == submission.thread_id
    assert len(set(by_hop.values())) == 4


async def test_finished_conversation_leaves_nothing_behind(example_organism: Organism) -> None:
    async with running(example_organism) as pump:
        reply = await ask(pump, Greeting("x"), to="greeter")
        assert reply.payload == GreetingReply("HELLO, X!")
        await pump.stop()
        assert pump.registry.debug_dump() == {}
        assert pump.buffer.list_threads() == []
        assert pump.stats().conversations == 0


async def test_thousand_concurrent_conversations_each_get_their_own_answer(example_organism: Organism) -> None:
    async with running(example_organism) as pump:
        submissions = [await pump.inject_payload(Greeting(f"n{i}"), "greeter") for i in range(1000)]
        threads = {submission.thread_id for submission in submissions}
        replies = [await submission.next_reply(30) for submission in submissions]
        for submission in submissions:
            await submission.collect(30)
        assert pump.registry.debug_dump() == {}
        assert pump.buffer.list_threads() == []
        assert pump.stats().conversations == 0

    assert len(threads) == 1000
    assert [reply.payload for reply in replies] == [GreetingReply(f"HELLO, N{i}!") for i in range(1000)]
    assert [reply.thread for reply in replies] == [submission.thread_id for submission in submissions]
