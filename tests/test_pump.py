"""Pump behaviour: limits, ordering, overload, ephemeral listeners, shutdown, isolation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.support import Bag, Ping, Pong, echo, envelope, ping_xml
from xml_pipeline import ErrorCode, HandlerMetadata, HandlerResponse, Huh
from xml_pipeline.memory.context_buffer import get_context_buffer
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.conversations import NoMoreReplies
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.message_bus.routing import Router
from xml_pipeline.message_bus.thread_registry import get_registry
from xml_pipeline.organism import Listener, Organism, PumpLimits
from xml_pipeline.testing import ask, running


class Gate:
    """A handler that blocks until the test opens the gate, counting how many wait at once."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.active = 0
        self.most_active = 0
        self.seen: list[str] = []
        self._changed = asyncio.Condition()

    async def wait_for_active(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.active == count)

    async def handler(self, payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.seen.append(payload.text)
        async with self._changed:
            self._changed.notify_all()
        try:
            await self.opened.wait()
        finally:
            self.active -= 1
        return HandlerResponse.respond(Pong(payload.text))


def organism(*listeners: Listener, **limits: object) -> Organism:
    return Organism.of("test", [Listener("echo", [Ping], echo, peers=[]), *listeners], PumpLimits(**limits))  # type: ignore[arg-type]


class UncountableBackend(InMemoryBackend):
    def registry_list_all(self) -> dict[str, str]:
        raise AssertionError("stats() must not scan the store")


async def test_stats_count_the_threads_of_open_conversations_without_scanning_the_store() -> None:
    gate = Gate()
    gated = organism(Listener("gate", [Ping], gate.handler, max_concurrency=10))
    async with running(gated, backend=UncountableBackend()) as pump:
        submissions = [await pump.inject_payload(Ping(str(i)), "gate") for i in range(3)]
        await gate.wait_for_active(3)
        assert (pump.stats().conversations, pump.stats().threads) == (3, 6)  # each: console, console.gate
        gate.opened.set()
        for submission in submissions:
            await submission.collect(5)
        assert (pump.stats().conversations, pump.stats().threads) == (0, 0)


async def test_global_in_flight_limit_holds() -> None:
    gate = Gate()
    async with running(organism(Listener("gate", [Ping], gate.handler, max_concurrency=100), max_in_flight=3)) as pump:
        submissions = [await pump.inject_payload(Ping(str(i)), "gate") for i in range(10)]
        await gate.wait_for_active(3)
        assert pump.stats().in_flight == 3
        gate.opened.set()
        replies = [await s.next_reply(5) for s in submissions]
    assert gate.most_active == 3
    assert [r.payload for r in replies] == [Pong(str(i)) for i in range(10)]


async def test_per_listener_concurrency_limit_holds() -> None:
    gate = Gate()
    async with running(organism(Listener("gate", [Ping], gate.handler, max_concurrency=2), max_in_flight=50)) as pump:
        submissions = [await pump.inject_payload(Ping(str(i)), "gate") for i in range(8)]
        await gate.wait_for_active(2)
        reply = await ask(pump, Ping("others still flow"), to="echo")
        assert reply.payload == Pong("others still flow")
        gate.opened.set()
        for submission in submissions:
            await submission.next_reply(5)
    assert gate.most_active == 2


async def test_single_concurrency_listener_handles_in_acceptance_order() -> None:
    gate = Gate()
    gate.opened.set()
    async with running(organism(Listener("gate", [Ping], gate.handler, max_concurrency=1))) as pump:
        submissions = [await pump.inject_payload(Ping(str(i)), "gate") for i in range(50)]
        for submission in submissions:
            await submission.next_reply(5)
    assert gate.seen == [str(i) for i in range(50)]


async def test_full_queue_answers_overload_and_recovers() -> None:
    gate = Gate()
    async with running(organism(Listener("gate", [Ping], gate.handler), queue_size=2)) as pump:
        # inject() does not yield to the loop, so nothing is dispatched between these calls
        accepted = [await pump.inject_payload(Ping(str(i)), "gate") for i in range(2)]
        refused = await pump.inject_payload(Ping("one too many"), "gate")
        error = await refused.next_reply(5)
        assert error.error_code is ErrorCode.OVERLOAD
        assert error.payload.retry_allowed is True
        gate.opened.set()
        assert [(await s.collect(5))[0].payload for s in accepted] == [Pong("0"), Pong("1")]
        again = await pump.inject_payload(Ping("again"), "gate")
        assert [reply.payload for reply in await again.collect(5)] == [Pong("again")]
        assert pump.stats().conversations == 0
        assert pump.registry.debug_dump() == {}


async def test_ephemeral_listener_can_be_added_and_removed() -> None:
    async with running(organism()) as pump:
        pump.register_generic_listener("collector", echo, [Ping])
        assert (await ask(pump, Ping("hi"), to="collector")).payload == Pong("hi")
        with pytest.raises(ValueError, match="exists already"):
            pump.register_generic_listener("collector", echo, [Ping])
        assert pump.unregister_listener("collector") is True
        assert (await ask(pump, Ping("hi"), to="collector")).error_code is ErrorCode.UNKNOWN_TARGET
        assert pump.unregister_listener("collector") is False


async def test_handlers_get_a_fresh_copy_never_the_senders_object() -> None:
    sent: list[Bag] = []
    received: list[Bag] = []

    async def sender(payload: Bag, metadata: HandlerMetadata) -> HandlerResponse:
        if metadata.from_id == "console":
            outgoing = Bag(["a"])
            sent.append(outgoing)
            return HandlerResponse(outgoing, to="mutator")
        return HandlerResponse.respond(payload)

    async def mutator(payload: Bag, metadata: HandlerMetadata) -> HandlerResponse:
        received.append(payload)
        payload.items.append("changed")
        return HandlerResponse.respond(payload)

    org = organism(Listener("sender", [Bag], sender), Listener("mutator", [Bag], mutator))
    async with running(org) as pump:
        reply = await ask(pump, Bag(), to="sender")
    assert reply.payload == Bag(["a", "changed"])
    assert sent == [Bag(["a"])]
    assert received[0] is not sent[0]


async def test_metadata_tells_the_handler_who_called_and_where_it_is() -> None:
    seen: list[HandlerMetadata] = []

    async def recorder(payload: Ping | Pong, metadata: HandlerMetadata) -> HandlerResponse:
        if isinstance(payload, Pong):  # the self-call's answer comes back here: pass it up
            return HandlerResponse.respond(payload)
        seen.append(metadata)
        if payload.count > 1:
            return HandlerResponse(Ping(payload.text, payload.count - 1), to="recorder")
        return HandlerResponse.respond(Pong(payload.text))

    async with running(organism(Listener("recorder", [Ping, Pong], recorder))) as pump:
        submission = await pump.inject_payload(Ping("x", 2), "recorder", sender="alice")
        assert [r.payload for r in await submission.collect(5)] == [Pong("x")]
    first, second = seen
    assert (first.from_id, first.own_name, first.is_self_call) == ("alice", "recorder", False)
    assert (second.from_id, second.own_name, second.is_self_call) == ("recorder", "recorder", True)
    assert first.conversation_id == second.conversation_id == submission.thread_id
    assert len({first.thread_id, second.thread_id, submission.thread_id}) == 3


async def test_runaway_conversation_stops_at_the_history_cap() -> None:
    async def forever(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse(payload, to="loop")

    async with running(organism(Listener("loop", [Ping], forever), max_slots_per_thread=20)) as pump:
        submission = await pump.inject_payload(Ping("spin"), "loop")
        error = await submission.next_reply(5)
        await submission.collect(5)
        assert pump.registry.debug_dump() == {}
    assert error.error_code is ErrorCode.HISTORY_FULL


async def test_client_may_continue_its_live_conversation() -> None:
    gate = Gate()
    async with running(organism(Listener("gate", [Ping], gate.handler))) as pump:
        first = await pump.inject_payload(Ping("slow"), "gate")
        again = await pump.inject(envelope(ping_xml("more"), thread=first.thread_id))
        assert again is first
        assert (await first.next_reply(5)).payload == Pong("more")
        stranger = await pump.inject(envelope(ping_xml("mine"), sender="mallory", thread=first.thread_id))
        assert stranger.thread_id != first.thread_id
        assert (await stranger.next_reply(5)).payload == Pong("mine")
        gate.opened.set()
        assert (await first.next_reply(5)).payload == Pong("slow")


async def test_the_same_name_with_and_without_a_token_is_not_the_same_client() -> None:
    """On the socket a client needs no token and may send as any name: as "alice" on alice's live thread it
    opens a conversation of its own instead of adding to hers, and alice with her token cannot continue
    one opened as "alice" without a token either."""
    gate = Gate()
    alice = ClientAccess.authenticated("alice", frozenset({"gate", "open-echo"}))
    posing = ClientAccess.anonymous()
    listeners = [
        Listener("gate", [Ping], gate.handler, ingress=True),
        Listener("open-echo", [Ping], echo, ingress=True),
    ]
    async with running(Organism.of("posing", listeners)) as pump:
        hers = await pump.inject(envelope(ping_xml("slow"), sender="alice", to="gate"), access=alice)
        forged = await pump.inject(
            envelope(ping_xml("injected"), sender="alice", to="open-echo", thread=hers.thread_id), access=posing
        )
        assert forged is not hers
        assert (await forged.next_reply(5)).payload == Pong("injected")
        anonymous = await pump.inject(envelope(ping_xml("held"), sender="alice", to="gate"), access=posing)
        claimed = await pump.inject(
            envelope(ping_xml("mine?"), sender="alice", to="open-echo", thread=anonymous.thread_id), access=alice
        )
        assert claimed is not anonymous
        assert (await claimed.next_reply(5)).payload == Pong("mine?")
        gate.opened.set()
        assert [reply.payload.text for reply in await hers.collect(5)] == ["slow"]
        assert [reply.payload.text for reply in await anonymous.collect(5)] == ["held"]


async def test_only_the_client_that_started_a_conversation_may_continue_it() -> None:
    """A continuation shares the conversation's replies, so another identity on the same thread starts its own.

    It holds because an authenticated client's <from> is its identity, and only the conversation's own
    sender continues it; without tokens, the thread (128 random bits the client was told) is the capability.
    """
    gate = Gate()
    alice = ClientAccess.authenticated("alice", frozenset({"gate", "open-echo"}))
    bob = ClientAccess.authenticated("bob", frozenset({"gate", "open-echo"}))
    listeners = [
        Listener("gate", [Ping], gate.handler, ingress=True),
        Listener("open-echo", [Ping], echo, ingress=True),
    ]
    async with running(Organism.of("owners", listeners)) as pump:
        first = await pump.inject(envelope(ping_xml("slow"), sender="alice", to="gate"), access=alice)
        thread = first.thread_id
        hijack = await pump.inject(envelope(ping_xml("bob"), sender="bob", to="open-echo", thread=thread), access=bob)
        assert hijack is not first
        assert (await hijack.next_reply(5)).payload == Pong("bob")
        mine = await pump.inject(
            envelope(ping_xml("more"), sender="alice", to="open-echo", thread=thread), access=alice
        )
        assert mine is first
        gate.opened.set()
        assert sorted(reply.payload.text for reply in await first.collect(5)) == ["more", "slow"]


async def test_stop_drains_in_flight_work() -> None:
    async def slow(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        await asyncio.sleep(0.05)
        return HandlerResponse.respond(Pong(payload.text))

    pump = Pump(organism(Listener("slow", [Ping], slow)))
    await pump.start()
    submissions = [await pump.inject_payload(Ping(str(i)), "slow") for i in range(20)]
    report = await pump.stop(drain_timeout=5)
    assert (report.drained, report.cancelled) == (True, 0)
    assert [s.pending()[0].payload for s in submissions] == [Pong(str(i)) for i in range(20)]
    refused = await pump.inject_payload(Ping("late"), "slow")
    assert (await refused.next_reply(1)).error_code is ErrorCode.SHUTTING_DOWN


async def test_stop_reports_what_it_had_to_cut_short(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline.pump")
    gate = Gate()
    pump = Pump(organism(Listener("gate", [Ping], gate.handler, timeout_seconds=60), max_in_flight=1))
    await pump.start()
    submissions = [await pump.inject_payload(Ping(str(i)), "gate") for i in range(3)]
    await gate.wait_for_active(1)
    report = await pump.stop(drain_timeout=0.05)
    assert (report.drained, report.cancelled) == (False, 3)
    for submission in submissions:
        assert (await submission.next_reply(1)).error_code is ErrorCode.SHUTTING_DOWN
        with pytest.raises(NoMoreReplies):
            await submission.next_reply(1)
    assert pump.registry.debug_dump() == {}
    assert pump.buffer.list_threads() == []


async def test_repair_is_off_by_default_and_logged_when_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="xml_pipeline.pump")
    slip = envelope(ping_xml("fixed")).replace(b"</message>", b"")
    async with running(organism()) as strict:
        assert (await (await strict.inject(slip)).next_reply(5)).error_code is ErrorCode.MALFORMED_XML
    caplog.clear()
    async with running(organism(repair=True)) as lenient:
        assert (await (await lenient.inject(slip)).next_reply(5)).payload == Pong("fixed")
    assert any("repaired" in record.getMessage() for record in caplog.records)


async def test_handlers_read_the_conversation_history_while_it_runs() -> None:
    seen: list[list[str]] = []

    async def historian(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        history = get_context_buffer().get_thread(metadata.conversation_id)
        seen.append([f"{slot.from_id}->{slot.to_id}:{slot.payload.text}" for slot in history])
        return HandlerResponse.respond(Pong(payload.text))

    async with running(organism(Listener("historian", [Ping], historian))) as pump:
        assert get_registry() is pump.registry
        await ask(pump, Ping("remember me"), to="historian")
    assert seen == [["console->historian:remember me"]]


async def test_huh_is_a_valid_reply_payload() -> None:
    async def puzzled(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        return HandlerResponse.respond(Huh("I did not understand", original=payload.text))

    async with running(organism(Listener("puzzled", [Ping], puzzled))) as pump:
        reply = await ask(pump, Ping("qwxz"), to="puzzled")
    assert reply.payload == Huh("I did not understand", original="qwxz")
    assert b"<huh><message>I did not understand</message><original>qwxz</original></huh>" in reply.envelope


async def test_a_bug_in_the_pump_is_reported_and_logged_never_lost(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_route(self: Router, delivery: object, result: object) -> None:
        raise KeyError("simulated bug")

    async with running(organism()) as pump:
        monkeypatch.setattr(Router, "route", broken_route)
        reply = await ask(pump, Ping("x"), to="echo")
        monkeypatch.undo()
        assert (await ask(pump, Ping("y"), to="echo")).payload == Pong("y")
    assert reply.error_code is ErrorCode.INTERNAL
    assert any("simulated bug" in (record.exc_text or "") or record.exc_info for record in caplog.records)


async def dispatched(pump: Pump) -> None:
    """Until the dispatcher has taken everything queued (a few turns of the loop)."""
    for _ in range(1000):
        if not pump.stats().queue_depth:
            return
        await asyncio.sleep(0)
    raise AssertionError("the dispatcher did not take what was queued")


async def test_a_forward_that_waits_too_long_for_queue_room_is_an_overload_to_the_client() -> None:
    release = asyncio.Event()

    async def forwarder(payload: Ping, metadata: HandlerMetadata) -> HandlerResponse:
        await release.wait()
        return HandlerResponse(Ping("on"), to="echo")

    gate = Gate()
    org = organism(Listener("gate", [Ping], gate.handler), max_in_flight=1, queue_size=1, enqueue_timeout_seconds=0.05)
    async with running(org) as pump:
        pump.register_generic_listener("forwarder", forwarder, [Ping], coordinator=True)  # takes no global slot
        forwarded = await pump.inject_payload(Ping("f"), "forwarder")
        await dispatched(pump)  # the forwarder waits for its release
        held = await pump.inject_payload(Ping("g"), "gate")
        await gate.wait_for_active(1)  # the gate holds the only global slot
        waiting = await pump.inject_payload(Ping("w"), "echo")
        await dispatched(pump)  # taken by the dispatcher, which waits for a slot
        queued = await pump.inject_payload(Ping("q"), "echo")  # fills the queue
        release.set()
        error = await forwarded.next_reply(5)
        assert error.error_code is ErrorCode.OVERLOAD
        assert "stayed full" in error.payload.message
        gate.opened.set()
        for submission in (held, waiting, queued):
            assert not (await submission.next_reply(5)).is_error
