"""cpu_bound listeners in worker processes, on every backend, and what happens when workers fail."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests import cpu_handlers
from tests.conftest import ROOT
from tests.daemon_support import cli, running_daemon, short_directory, write_organism
from tests.redis_server import RedisServer, free_port
from tests.support import Ping, Pong, echo, envelope, forwarder
from workers.cpu import Crunch, Crunched, checksum, crunch
from xml_pipeline import ErrorCode, HandlerMetadata
from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.memory.store_watch import StoreState
from xml_pipeline.message_bus.conversations import Reply
from xml_pipeline.message_bus.pump import Pump
from xml_pipeline.organism import Listener, Organism
from xml_pipeline.process_pool import pool as pool_module
from xml_pipeline.process_pool.crash_record import MAX_CRASHES, REMEMBERED_PAYLOADS, CrashRecord
from xml_pipeline.process_pool.generation import EXIT_WAIT
from xml_pipeline.process_pool.wire import FrameReader, Hello, frame
from xml_pipeline.process_pool.worker import Outcome, Task
from xml_pipeline.testing import ask, running


def cpu_organism(**pool: int) -> Organism:
    organism = Organism.of(
        "cpu",
        [
            Listener("cruncher", [Crunch], crunch, cpu_bound=True, peers=[], timeout_seconds=10),
            Listener("whoami", [Ping], cpu_handlers.whoami, cpu_bound=True),
            Listener("explode", [Ping], cpu_handlers.explode, cpu_bound=True),
            Listener("gives-up", [Ping], cpu_handlers.gives_up, cpu_bound=True),
            Listener("spin", [Ping], cpu_handlers.spin, cpu_bound=True, timeout_seconds=0.3),
            Listener("nap", [Ping], cpu_handlers.nap, cpu_bound=True, timeout_seconds=0.3),
            Listener("victim", [Ping], cpu_handlers.pid_then_nap, cpu_bound=True, timeout_seconds=60),
            Listener("liar", [Ping], cpu_handlers.wrong_type, cpu_bound=True),
            Listener("historian", [Ping], cpu_handlers.writes_history, cpu_bound=True),
            Listener("relay", [Ping, Pong], forwarder("historian"), peers=["historian"]),
            Listener("echo", [Ping], echo),
        ],
    )
    organism.settings = {"process_pool": {"workers": 2, **pool}}
    return organism


@pytest.fixture
async def memory_pump() -> AsyncIterator[Pump]:
    async with running(cpu_organism()) as pump:
        yield pump


async def ask_until_the_end(pump: Pump, payload: Crunch) -> Reply:
    """The only reply, returned once the conversation has ended (its state is deleted before)."""
    submission = await pump.inject_payload(payload, "cruncher")
    [reply] = await submission.collect(10)
    return reply


async def test_cpu_bound_handlers_answer_and_see_history_on_shared_backends(backend: SharedBackend) -> None:
    shared = not isinstance(backend, InMemoryBackend)
    async with running(cpu_organism(), backend=backend) as pump:
        reply = await ask(pump, Crunch("abc", 100), to="cruncher")
        assert isinstance(reply.payload, Crunched)
        assert reply.payload.checksum == checksum("abc", 100)
        assert reply.payload.worker_pid != os.getpid()
        assert reply.payload.worker_pid in pump.pool.worker_pids()  # type: ignore[union-attr]
        # the worker reads the history the daemon wrote (shared backends only)
        assert reply.payload.history_seen == (1 if shared else 0)
        seen = await ask(pump, Ping("x"), to="relay")
        assert seen.payload == Pong("console>relay|relay>historian" if shared else "")
        answers = await asyncio.gather(*(ask_until_the_end(pump, Crunch(f"t{i}", 50)) for i in range(20)))
        assert [a.payload.checksum for a in answers] == [checksum(f"t{i}", 50) for i in range(20)]
        assert pump.registry.debug_dump() == {}  # each client heard of its end after its state was deleted
        assert pump.buffer.list_threads() == []
    if isinstance(backend, RedisBackend):
        assert backend.keys() == []


@pytest.mark.parametrize(
    ("target", "code", "detail"),
    [
        ("explode", ErrorCode.HANDLER_ERROR, "ValueError: boom in worker"),
        ("gives-up", ErrorCode.HANDLER_ERROR, "TimeoutError: the upstream service"),  # its own, not its deadline
        ("spin", ErrorCode.HANDLER_TIMEOUT, "did not finish within 0.3s"),
        ("nap", ErrorCode.HANDLER_TIMEOUT, "did not finish within 0.3s"),
        ("liar", ErrorCode.BAD_RESPONSE, "returned int"),
    ],
)
async def test_worker_failures_become_system_errors_and_workers_survive(
    memory_pump: Pump, target: str, code: ErrorCode, detail: str
) -> None:
    workers_before = sorted(memory_pump.pool.worker_pids())  # type: ignore[union-attr]
    reply = await ask(memory_pump, Ping("x"), to=target)
    assert reply.error_code is code, reply.payload
    assert detail in reply.payload.message
    after = await ask(memory_pump, Ping("x"), to="whoami")
    assert int(after.payload.text) in workers_before
    assert sorted(memory_pump.pool.worker_pids()) == workers_before  # type: ignore[union-attr]
    assert memory_pump.pool.rebuilds == 0  # type: ignore[union-attr]


async def test_a_worker_killed_mid_task_is_a_worker_crash_and_the_pool_is_rebuilt(
    memory_pump: Pump, tmp_path: Path
) -> None:
    pid_file = tmp_path / "victim.pid"
    submission = await memory_pump.inject_payload(Ping(str(pid_file)), "victim")
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():  # the worker writes it when the call starts
        assert time.monotonic() < deadline, "the victim never started"
        await asyncio.sleep(0.01)
    victim = int(pid_file.read_text())
    os.kill(victim, signal.SIGKILL)
    reply = await submission.next_reply(20)
    assert reply.error_code is ErrorCode.WORKER_CRASH
    assert reply.payload.retry_allowed is True
    assert memory_pump.pool.rebuilds == 1  # type: ignore[union-attr]
    after = await ask(memory_pump, Ping("x"), to="whoami", timeout=20)
    assert int(after.payload.text) != victim
    assert (await ask(memory_pump, Crunch("ok", 10), to="cruncher")).payload.checksum == checksum("ok", 10)


async def test_max_tasks_per_child_replaces_workers() -> None:
    async with running(cpu_organism(workers=1, max_tasks_per_child=2)) as pump:
        pids = [int((await ask(pump, Ping("x"), to="whoami", timeout=20)).payload.text) for _ in range(6)]
    # no worker serves more than two tasks (the pool's warm-up call counts as one)
    assert max(Counter(pids).values()) <= 2
    assert len(set(pids)) >= 3


async def test_redis_stopping_and_returning_during_traffic() -> None:
    server = RedisServer()
    server.start()
    backend = RedisBackend(server.url, prefix="restart:", retries=1, socket_timeout=0.5)
    try:
        async with running(cpu_organism(), backend=backend) as pump:
            assert (await ask(pump, Ping("before"), to="echo")).payload == Pong("before")
            server.stop()
            down = await ask(pump, Ping("during"), to="echo")
            assert down.error_code is ErrorCode.BACKEND_UNAVAILABLE
            assert down.payload.retry_allowed is True
            assert pump.healthy
            server.start()
            # the store watch probes every second; its next probe finds Redis back and lets calls through
            assert (await pump.store_watch.probe_once()).state is StoreState.OK
            assert (await ask(pump, Ping("after"), to="echo")).payload == Pong("after")
            crunched = await ask(pump, Crunch("after", 10), to="cruncher", timeout=20)
            assert crunched.payload.history_seen == 1  # the workers reconnected too
    finally:
        backend.close()
        server.close()


def test_daemon_with_redis_down_at_start_exits_with_a_clear_error() -> None:
    with short_directory() as directory:
        organism = directory / "organism.yaml"
        write_organism(organism)
        organism.write_text(
            organism.read_text() + f"\nbackend:\n  type: redis\n  redis_url: redis://127.0.0.1:{free_port()}/0\n"
        )
        result = cli("run", str(organism), "--socket", str(directory / "d.sock"))
    assert result.returncode == 1
    assert "the backend is unavailable: redis at redis://127.0.0.1:" in result.stderr
    assert "does not answer" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["manager", "redis"])
def test_daemon_runs_the_example_cpu_bound_listener_on_shared_backends(kind: str, redis_server: RedisServer) -> None:
    prefix = f"daemon-{uuid.uuid4().hex[:8]}:"
    backend_yaml = f"\nbackend:\n  type: {kind}\n"
    if kind == "redis":
        backend_yaml += f'  redis_url: {redis_server.url}\n  redis_prefix: "{prefix}"\n'
    with short_directory() as directory:
        organism = directory / "organism.yaml"
        write_organism(organism)
        organism.write_text(organism.read_text() + backend_yaml)
        with running_daemon(organism) as daemon:
            sent = cli(
                "send",
                "--socket",
                str(daemon.socket_path),
                "cruncher",
                "<Crunch><text>abc</text><rounds>100</rounds></Crunch>",
            )
            assert sent.returncode == 0, sent.stderr
            assert f"<checksum>{checksum('abc', 100)}</checksum><history_seen>1</history_seen>" in sent.stdout
            status = daemon.client.status()
            assert status["backend"] == kind
            assert len(status["worker_pids"]) == 2
            assert daemon.stop() == 0
    if kind == "redis":  # the conversation's trace stays for observe.trace_retention_seconds, by design
        left = RedisBackend(redis_server.url, prefix=prefix).keys()
        assert [key for key in left if not key.startswith(f"{prefix}trace")] == []


def test_workers_exit_when_the_daemon_is_killed_outright() -> None:
    with short_directory() as directory:
        organism = directory / "organism.yaml"
        write_organism(organism)
        organism.write_text(organism.read_text() + "\nbackend:\n  type: manager\n")
        with running_daemon(organism) as daemon:
            workers = daemon.client.status()["worker_pids"]
            helpers = [int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(daemon.process.pid)]).split()]
            assert set(workers) <= set(helpers)
            assert len(helpers) >= 3  # two workers and the manager's server
            daemon.process.kill()
            daemon.process.wait(10)
            deadline = time.monotonic() + 10
            while any(Path(f"/proc/{pid}").exists() for pid in helpers):
                assert time.monotonic() < deadline, "helper processes outlived the daemon"
                time.sleep(0.05)  # waiting on other processes' exit; nothing to await


async def test_calls_waiting_for_a_worker_are_not_mistaken_for_stuck_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten quarter-second calls on one worker take 2.5 s; each is within its 0.5 s timeout, and
    the wait in line must not count towards the deadline after which a worker is declared stuck."""
    monkeypatch.setattr(pool_module, "STUCK_GRACE", 0.2)
    listener = Listener("busy", [Ping], cpu_handlers.busy, cpu_bound=True, timeout_seconds=0.5, max_concurrency=10)
    organism = Organism.of("queue", [listener])
    organism.settings = {"process_pool": {"workers": 1}}
    async with running(organism) as pump:
        replies = await asyncio.gather(*(ask(pump, Ping(str(n)), "busy", timeout=30) for n in range(10)))
        assert [reply.error_code for reply in replies] == [None] * 10
        assert [reply.payload.text for reply in replies] == [str(n) for n in range(10)]
        assert pump.pool is not None
        assert pump.pool.rebuilds == 0


async def until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait for something another process does (it writes a file), for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def crash_organism(**pool: int) -> Organism:
    organism = Organism.of(
        "crashes",
        [
            Listener("crasher", [Ping], cpu_handlers.notes_then_dies, cpu_bound=True, max_concurrency=20),
            Listener("worker", [Ping], cpu_handlers.works_a_while, cpu_bound=True, max_concurrency=20),
            Listener("held", [Ping], cpu_handlers.pid_then_wait_for_release, cpu_bound=True, max_concurrency=10),
            Listener("whoami", [Ping], cpu_handlers.whoami, cpu_bound=True),
            Listener("stuck", [Ping], cpu_handlers.stuck_beyond_signals, cpu_bound=True, timeout_seconds=0.3),
        ],
    )
    organism.settings = {"process_pool": {"workers": 2, **pool}}
    return organism


async def test_calls_that_crash_their_worker_fail_alone_beside_ordinary_calls(tmp_path: Path) -> None:
    """Twenty calls that end their worker (four payloads, five copies each) mixed with twenty ordinary
    ones: every ordinary call answers, every crashing call gets worker-crash, and no payload runs
    more than MAX_CRASHES times, plus one copy started beside another before either crash counted."""
    runs = tmp_path / "runs.log"
    payloads = [f"{runs}|{'kill' if tag % 2 else 'exit'}|{tag}" for tag in range(4)]
    async with running(crash_organism()) as pump:
        crashing = [ask(pump, Ping(payloads[n % 4]), "crasher", timeout=60) for n in range(20)]
        ordinary = [ask(pump, Ping(str(n)), "worker", timeout=60) for n in range(20)]
        replies = await asyncio.gather(*(call for pair in zip(crashing, ordinary, strict=True) for call in pair))
        crashed, answered = replies[0::2], replies[1::2]
        assert [reply.error_code for reply in answered] == [None] * 20
        assert [reply.payload.text for reply in answered] == [str(n) for n in range(20)]
        assert {reply.error_code for reply in crashed} <= {ErrorCode.WORKER_CRASH, ErrorCode.CRASH_LOOP}
        ran = Counter(runs.read_text().splitlines())
        assert set(ran) == set(payloads)
        assert max(ran.values()) <= MAX_CRASHES + 1
        refused = Counter(reply.payload.message for reply in crashed if "refused" in reply.payload.message)
        assert sum(refused.values()) >= 20 - 4 * (MAX_CRASHES + 1)
        assert pump.pool is not None
        assert 0 < pump.pool.rebuilds <= sum(ran.values())  # two workers crashing at once break one executor
        assert (await ask(pump, Ping("after"), "whoami", timeout=20)).error_code is None


def started_calls(directory: Path) -> dict[int, int]:
    """Which calls of ``held`` have started, and in which worker: call number to pid."""
    return {int(path.stem): int(path.read_text()) for path in directory.glob("*.pid") if path.read_text()}


async def test_killing_one_worker_fails_only_the_call_it_was_running(tmp_path: Path) -> None:
    """Ten calls in flight on two workers, two of them running: kill -9 one worker, and only the call
    in it fails; the one stopped in the other worker and the eight waiting all run on the new pool."""
    async with running(crash_organism()) as pump:
        submissions = [await pump.inject_payload(Ping(f"{tmp_path}|{n}"), "held") for n in range(10)]
        await until(lambda: len(started_calls(tmp_path)) == 2, "two calls never started")
        victim_call, victim_pid = min(started_calls(tmp_path).items())
        os.kill(victim_pid, signal.SIGKILL)
        (tmp_path / "release").touch()
        replies = [await submission.next_reply(30) for submission in submissions]
        assert [n for n, reply in enumerate(replies) if reply.error_code is not None] == [victim_call]
        assert replies[victim_call].error_code is ErrorCode.WORKER_CRASH
        assert "died during the call" in replies[victim_call].payload.message
        assert victim_pid not in {int(reply.payload.text) for reply in replies if reply.error_code is None}
        assert pump.pool is not None
        assert pump.pool.rebuilds == 1


async def test_a_stuck_worker_is_killed_alone_and_the_call_beside_it_runs_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "STUCK_GRACE", 1.0)
    async with running(crash_organism()) as pump:
        stuck = await pump.inject_payload(Ping(f"{tmp_path}|0"), "stuck")
        await until(lambda: 0 in started_calls(tmp_path), "the stuck call never started")
        beside = await pump.inject_payload(Ping(f"{tmp_path}|1"), "held")
        await until(lambda: 1 in started_calls(tmp_path), "the call beside it never started")
        first_run = started_calls(tmp_path)
        timed_out = await stuck.next_reply(20)
        assert timed_out.error_code is ErrorCode.HANDLER_TIMEOUT
        assert "it was killed" in timed_out.payload.message
        beside_worker = Path(f"/proc/{first_run[1]}")
        await until(lambda: not beside_worker.exists(), "the broken pool did not stop the worker beside it")
        (tmp_path / "release").touch()
        answered = await beside.next_reply(20)
        assert answered.error_code is None, answered.payload
        assert int(answered.payload.text) not in first_run.values()  # it ran again, on the new workers
        assert pump.pool is not None
        assert pump.pool.rebuilds == 1


async def test_a_payload_that_crashes_every_time_is_refused_after_max_crashes(tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    crasher = Ping(f"{runs}|exit|always")
    async with running(crash_organism()) as pump:
        replies = [await ask(pump, crasher, "crasher", timeout=30) for _ in range(MAX_CRASHES + 2)]
        codes = [reply.error_code for reply in replies]
        assert codes == [ErrorCode.WORKER_CRASH] * MAX_CRASHES + [ErrorCode.CRASH_LOOP] * 2
        assert replies[-1].payload.retry_allowed is False
        assert len(runs.read_text().splitlines()) == MAX_CRASHES  # the side channel: runs, not replies
        messages = [reply.payload.message for reply in replies]
        assert all("died during the call" in message for message in messages[:MAX_CRASHES])
        assert all(f"refused: this payload crashed a worker {MAX_CRASHES} times" in m for m in messages[MAX_CRASHES:])
        assert pump.pool is not None
        assert pump.pool.rebuilds == MAX_CRASHES
        other = await ask(pump, Ping(f"{runs}|exit|another"), "crasher", timeout=30)
        assert "died during the call" in other.payload.message  # refusal is per payload
        assert (await ask(pump, Ping("after"), "whoami", timeout=20)).error_code is None


async def test_respelling_a_crash_looping_payload_does_not_get_it_past_the_refusal(tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    text = f"{runs}|exit|always"
    spellings = [
        f'<Ping xmlns=""><text>{text}</text></Ping>',
        f'<Ping xmlns="" xmlns:unused="urn:unused">\n  <text>{text}</text>\n</Ping>',
        f'<Ping xmlns=""><!-- once more --><text><![CDATA[{text}]]></text></Ping >',
        f'<Ping xmlns="">\t<text>{text}</text></Ping>',
    ]
    async with running(crash_organism()) as pump:
        codes = []
        for spelling in spellings:
            submission = await pump.inject(envelope(spelling, to="crasher"))
            codes.append((await submission.next_reply(30)).error_code)
    assert codes == [ErrorCode.WORKER_CRASH] * MAX_CRASHES + [ErrorCode.CRASH_LOOP]
    assert len(runs.read_text().splitlines()) == MAX_CRASHES


def _task(xml: bytes) -> Task:
    metadata = HandlerMetadata(thread_id="t", from_id="f", own_name="o", conversation_id="c")
    return Task("tests.cpu_handlers.whoami", "tests.support.Ping", xml, metadata, timeout=1)


def test_the_crash_record_counts_crashes_in_a_row_per_payload_and_stays_bounded() -> None:
    record = CrashRecord(max_crashes=2, remembered=3)
    first, second = _task(b"<Ping><text>a</text></Ping>"), _task(b"<Ping><text>b</text></Ping>")
    assert record.count_crash(first) == 1
    assert not record.refuses(first)
    record.forget(first)  # it completed once: the crashes before were not its alone
    assert record.crashes(first) == 0
    record.count_crash(first)
    record.count_crash(first)
    assert record.refuses(first)
    assert not record.refuses(second)
    for n in range(3):
        record.count_crash(_task(f"<Ping><text>{n}</text></Ping>".encode()))
    assert record.crashes(first) == 0  # the oldest is forgotten first


def test_the_readme_states_the_refusal_limits_the_pool_applies() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"has crashed a worker {MAX_CRASHES} times in a row is refused" in readme
    assert f"the pool remembers the last {REMEMBERED_PAYLOADS} crashing payloads" in readme


def test_the_crash_record_counts_equivalent_xml_as_the_same_payload() -> None:
    record = CrashRecord(max_crashes=3)
    record.count_crash(_task(b"<Ping><text>a b</text></Ping>"))
    record.count_crash(_task(b'<Ping >\n  <text xmlns:unused="urn:x">a b</text>\n</Ping>'))
    record.count_crash(_task(b"<Ping><!-- again --><text><![CDATA[a b]]></text></Ping>"))
    assert record.refuses(_task(b"<Ping>\t<text>a b</text></Ping>"))
    assert not record.refuses(_task(b"<Ping><text>a  b</text></Ping>"))  # a field's text is the payload
    assert not record.refuses(_task(b"<Ping><text> a b</text></Ping>"))


def batch_organism(**pool: int) -> Organism:
    organism = Organism.of(
        "batches",
        [
            Listener("crasher", [Ping], cpu_handlers.notes_then_dies, cpu_bound=True, max_concurrency=20),
            Listener("notes", [Ping], cpu_handlers.notes, cpu_bound=True, max_concurrency=20),
            Listener("whoami", [Ping], cpu_handlers.whoami, cpu_bound=True, max_concurrency=20),
        ],
    )
    organism.settings = {"process_pool": pool}
    return organism


async def test_a_worker_dying_mid_batch_fails_only_its_call_and_keeps_the_answers_it_sent(tmp_path: Path) -> None:
    """One worker holds a whole batch on its socket: the calls before the one that kills it have
    answered (their outcomes may still be unread when it dies), the calls after it never started.
    Each of those runs exactly once and answers; only the call that killed the worker fails."""
    runs = tmp_path / "runs.log"
    calls = [("notes", Ping(f"{runs}|before-{n}")) for n in range(2)]
    calls += [("crasher", Ping(f"{runs}|kill|crash"))]
    calls += [("notes", Ping(f"{runs}|after-{n}")) for n in range(5)]
    async with running(batch_organism(workers=1)) as pump:
        submissions = [await pump.inject_payload(payload, to) for to, payload in calls]
        replies = [await submission.next_reply(30) for submission in submissions]
        assert [reply.error_code for reply in replies] == [None, None, ErrorCode.WORKER_CRASH] + [None] * 5
        assert "died during the call" in replies[2].payload.message
        assert [reply.payload.text for n, reply in enumerate(replies) if n != 2] == [
            *(f"before-{n}" for n in range(2)),
            *(f"after-{n}" for n in range(5)),
        ]
        ran = Counter(runs.read_text().splitlines())
        assert ran == Counter(
            {f"{runs}|kill|crash": 1, **{f"before-{n}": 1 for n in range(2)}} | {f"after-{n}": 1 for n in range(5)}
        )
        assert pump.pool is not None
        assert pump.pool.rebuilds == 1


async def test_a_worker_killed_between_calls_fails_nothing_and_is_replaced_at_once() -> None:
    async with running(batch_organism(workers=2)) as pump:
        assert pump.pool is not None
        victim = pump.pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await until(lambda: pump.pool is not None and pump.pool.rebuilds == 1, "the pool was not rebuilt")
        replies = await asyncio.gather(*(ask(pump, Ping("x"), "whoami", timeout=30) for _ in range(20)))
        assert [reply.error_code for reply in replies] == [None] * 20
        assert victim not in {int(reply.payload.text) for reply in replies}
        assert victim not in pump.pool.worker_pids()


async def test_max_tasks_per_child_holds_for_calls_sent_in_one_batch(tmp_path: Path) -> None:
    """Calls handed over together to a worker near its limit wait for its successor."""
    async with running(batch_organism(workers=1, max_tasks_per_child=3)) as pump:
        replies = await asyncio.gather(*(ask(pump, Ping("x"), "whoami", timeout=30) for _ in range(10)))
        assert [reply.error_code for reply in replies] == [None] * 10
        pids = Counter(int(reply.payload.text) for reply in replies)
        assert max(pids.values()) <= 3
        assert len(pids) >= 4
        assert pump.pool is not None
        assert pump.pool.rebuilds == 0


async def test_the_pool_leaves_no_worker_and_no_socket_behind() -> None:
    async with running(batch_organism(workers=2)) as pump:
        assert pump.pool is not None
        workers = pump.pool.worker_pids()
        address = pump.pool.address
        assert address.startswith("\0")  # abstract: no file to leave behind, even if the daemon is killed
        assert (await ask(pump, Ping("x"), "whoami", timeout=30)).error_code is None
    with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as stranger:
        stranger.connect(address)
    await until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived its pool")


@pytest.mark.parametrize(
    "greeting",
    [Hello(b"not the secret..", 1, 4242).framed(), frame(("a", "pickle", "first")), b"\xff\xff\xff\xffjunk"],
    ids=["wrong secret", "pickle first", "huge length"],
)
async def test_the_pool_socket_closes_a_connection_without_the_workers_greeting(greeting: bytes) -> None:
    async with running(batch_organism(workers=1)) as pump:
        assert pump.pool is not None
        stranger = socket.socket(socket.AF_UNIX)
        stranger.connect(pump.pool.address)
        reader, writer = await asyncio.open_unix_connection(sock=stranger)
        writer.write(greeting)
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed, and sent nothing
        writer.close()
        assert (await ask(pump, Ping("x"), "whoami", timeout=30)).error_code is None


def test_frames_are_cut_whole_however_the_bytes_arrive() -> None:
    messages = [("call", n, b"x" * n) for n in (0, 1, 300, 70_000)]
    stream = b"".join(frame(message) for message in messages)
    for step in (1, 7, 4096, len(stream)):
        reader = FrameReader()
        received = []
        for start in range(0, len(stream), step):
            received += reader.feed(stream[start : start + step])
        assert received == messages
    hello = Hello(b"0123456789abcdef", 7, 4242)
    greeted = FrameReader(greeting=True)
    first, *rest = [message for byte in hello.framed() + stream for message in greeted.feed(bytes([byte]))]
    assert (Hello.parse(first), rest) == (hello, messages)


async def test_a_worker_killed_before_it_reads_its_batch_fails_nothing(tmp_path: Path) -> None:
    """A stopped worker cannot read the calls sent to it; killed then, it has started none of them,
    so none fails: each runs once on the new worker."""
    runs = tmp_path / "runs.log"
    async with running(batch_organism(workers=1)) as pump:
        assert pump.pool is not None
        [victim] = pump.pool.worker_pids()
        os.kill(victim, signal.SIGSTOP)
        try:
            submissions = [await pump.inject_payload(Ping(f"{runs}|{n}"), "notes") for n in range(6)]
            await asyncio.sleep(0.2)  # the first calls are on the stopped worker's socket by now
        finally:
            os.kill(victim, signal.SIGKILL)
        replies = [await submission.next_reply(30) for submission in submissions]
        assert [reply.error_code for reply in replies] == [None] * 6
        assert Counter(runs.read_text().splitlines()) == Counter(str(n) for n in range(6))
        assert pump.pool.rebuilds == 1


async def test_closing_while_new_workers_start_stops_them_without_waiting_out_a_timeout() -> None:
    """Workers still starting when the pool closes connect after the others were told to stop;
    they are told too, so the close does not wait for a timeout to kill them."""
    async with running(batch_organism(workers=2)) as pump:
        pool = pump.pool
        assert pool is not None
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        await until(lambda: pool.rebuilds == 1, "the pool was not rebuilt")
        starting = pool.worker_pids()
        closing = time.monotonic()
    assert time.monotonic() - closing < EXIT_WAIT
    await until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in starting), "a new worker outlived the pool")


def test_tasks_and_outcomes_cross_the_socket_whole() -> None:
    metadata = HandlerMetadata("t", "f", "o", "c", is_self_call=True, delivery_attempt=3)
    task = Task("a.handler", "a.Payload", b"<Payload/>", metadata, timeout=2.5, traceparent="00-ab-cd-01")
    assert Task.unpacked(pickle.loads(frame(task.packed())[4:])) == task
    outcome = Outcome("response", "peer", "a.Reply", b"<Reply/>", "", 4242)
    assert Outcome.unpacked(pickle.loads(frame(outcome.packed())[4:])) == outcome


def stranger_reads(address: str, greeting: bytes, uid: int) -> str:
    """In a forked child running as ``uid``: connect, greet, and say what came back."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # only socket calls here, then _exit: nothing the parent's threads hold is touched
        answer = "nothing"
        try:
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(address)
                answer = "connected"
                try:
                    sock.sendall(greeting)
                    answer = f"{len(sock.recv(100))} bytes"
                except (BrokenPipeError, ConnectionResetError):
                    answer = "0 bytes"
        finally:
            os.write(write_end, answer.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answer_pipe:
        answer = answer_pipe.read()
    os.waitpid(child, 0)
    return answer


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
async def test_the_pool_socket_closes_a_connection_from_another_user_even_with_the_secret() -> None:
    async with running(batch_organism(workers=1)) as pump:
        pool = pump.pool
        assert pool is not None
        workers = pool.worker_pids()
        greeting = Hello(pool._door.token, pool._generation.number, 4242).framed()  # the secret, as a worker has it
        answer = await asyncio.to_thread(stranger_reads, pool.address, greeting, 65534)
        assert answer == "0 bytes"  # closed without a byte
        assert pool.worker_pids() == workers
        assert (await ask(pump, Ping("x"), "whoami", timeout=30)).error_code is None
