"""Several real daemons, one Redis, delivery at-least-once: nothing accepted is lost when daemons die."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from tests.cluster_handlers import CURE_FILE, RUNS_FILE
from tests.daemon_support import DaemonProcess, cli, running_daemon, short_directory, wait_until, write_organism
from tests.redis_server import RedisServer
from xml_pipeline.message.envelope import read_envelope
from xml_pipeline.message.safe_xml import parse_untrusted

LISTENERS = """
listeners:
  - name: echo
    payload_class: tests.support.Ping
    handler: tests.cluster_handlers.counted_echo
    peers: []
    ingress: true
    max_concurrency: 200
  - name: slow
    payload_class: tests.support.Ping
    handler: tests.cluster_handlers.slow_counted_echo
    peers: []
    ingress: true
    timeout_seconds: 2
    max_concurrency: 1000
  - name: fanout
    payload_class: [tests.support.Ping, xml_pipeline.primitives.BufferComplete]
    handler: tests.cluster_handlers.fan_out
    peers: [system.buffer]
    ingress: true
    timeout_seconds: 300
  - name: dispatcher
    payload_class: [tests.support.Ping, xml_pipeline.primitives.BufferDispatched]
    handler: tests.cluster_handlers.dispatch
    peers: [system.buffer]
    ingress: true
  - name: poisoned
    payload_class: tests.support.Ping
    handler: tests.cluster_handlers.poisoned_echo
    peers: []
    ingress: true
    timeout_seconds: 2
"""


def cluster_organism(directory: Path, redis_url: str, *, max_deliveries: int = 3) -> Path:
    path = directory / "organism.yaml"
    path.write_text(
        "organism:\n  name: cluster\n  reply_retention_seconds: 60\n"
        "pump:\n  max_in_flight: 1000\n  queue_size: 5000\n"
        f"backend:\n  type: redis\n  redis_url: {redis_url}\n  redis_prefix: 'c{uuid.uuid4().hex[:6]}:'\n"
        f"  delivery: at-least-once\n  max_deliveries: {max_deliveries}\n  claim_grace_seconds: 1\n" + LISTENERS
    )
    return path


@contextlib.contextmanager
def daemons(organism: Path, count: int, runs: Path) -> Iterator[list[DaemonProcess]]:
    env = {RUNS_FILE: str(runs), CURE_FILE: str(runs.with_suffix(".cured"))}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_daemon(organism, env=env)) for _ in range(count)]


@pytest.fixture
def redis_for_cluster() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


def envelope(target: str, text: str, count: int = 1) -> bytes:
    return (
        '<message xmlns="https://xml-pipeline.org/ns/envelope/v1"><meta><from>console</from>'
        f"<to>{target}</to><thread>{uuid.uuid4()}</thread></meta>"
        f'<Ping xmlns=""><text>{text}</text><count>{count}</count></Ping></message>'
    ).encode()


async def post_all(sockets: list[Path], target: str, texts: list[str], count: int = 1) -> list[str]:
    """Send each text round-robin over the daemons' sockets; the threads they accepted (202)."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path), limit=50)) for path in sockets]
    try:

        async def post(index: int, text: str) -> str:
            session = sessions[index % len(sessions)]
            async with session.post("http://daemon/messages", data=envelope(target, text, count)) as answer:
                assert answer.status == 202, await answer.text()
                return str((await answer.json())["thread"])

        return list(await asyncio.gather(*(post(i, text) for i, text in enumerate(texts))))
    finally:
        for session in sessions:
            await session.close()


async def collect_all(sockets: list[Path], threads: list[str], timeout: float = 60) -> list[list[str]]:
    """Every conversation's replies until it ends, asked of the daemons round-robin (not the one that took it)."""
    sessions = [aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path), limit=50)) for path in sockets]
    try:

        async def collect(index: int, thread: str) -> list[str]:
            session = sessions[(index + 1) % len(sessions)]
            url = f"http://daemon/threads/{thread}/replies?wait=end&timeout={timeout:g}"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout + 30)) as answer:
                assert answer.status == 200, await answer.text()
                body = await answer.json()
                assert body["ended"] is True, body
                return list(body["replies"])

        return list(await asyncio.gather(*(collect(i, thread) for i, thread in enumerate(threads))))
    finally:
        for session in sessions:
            await session.close()


def texts_of(replies: list[list[str]]) -> list[str | None]:
    found: list[str | None] = []
    for conversation in replies:
        assert len(conversation) == 1, conversation
        payload = read_envelope(parse_untrusted(conversation[0].encode())).payload
        found.append(payload.findtext("text") if payload.tag == "Pong" else f"error:{payload.findtext('code')}")
    return found


async def kill_9(daemon: DaemonProcess) -> int:
    """SIGKILL ``daemon`` and wait (bounded) until it is gone; its exit status."""
    daemon.process.kill()
    return await asyncio.to_thread(daemon.process.wait, 10)


def runs_of(runs: Path) -> Counter[str]:
    return Counter(line.split()[0] for line in runs.read_text().splitlines()) if runs.exists() else Counter()


def conversation_keys(server: RedisServer) -> list[bytes]:
    """Keys a finished conversation must not leave behind: its hash, threads, history and registry entries."""
    client = redis.Redis.from_url(server.url)
    try:
        patterns = ("*conv:*", "*conv-threads:*", "*buf:*", "*reg:*")
        return [key for pattern in patterns for key in client.scan_iter(match=pattern, count=1000)]
    finally:
        client.close()


def stream_lengths(server: RedisServer) -> dict[bytes, int]:
    client = redis.Redis.from_url(server.url)
    try:
        return {key: int(client.xlen(key)) for key in client.scan_iter(match="*s:*", count=1000)}
    finally:
        client.close()


async def test_three_daemons_answer_3000_conversations_once_and_leave_nothing(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.log"
    with short_directory() as directory, daemons(cluster_organism(directory, redis_for_cluster.url), 3, runs) as group:
        sockets = [daemon.socket_path for daemon in group]
        texts = [f"m{i}" for i in range(3000)]
        threads = await post_all(sockets, "echo", texts)
        replies = await collect_all(sockets, threads)
        assert texts_of(replies) == texts
        assert set(runs_of(runs)) == set(texts)
        assert conversation_keys(redis_for_cluster) == []
        assert set(stream_lengths(redis_for_cluster).values()) == {0}  # acknowledged entries are deleted
        handled_by = Counter(line.split()[2] for line in runs.read_text().splitlines())
        assert len(handled_by) == 3, handled_by  # every daemon took a share
        for daemon in group:
            assert await asyncio.to_thread(daemon.stop) == 0


async def test_kill_9_of_one_daemon_with_500_in_flight_loses_nothing(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.log"
    with short_directory() as directory, daemons(cluster_organism(directory, redis_for_cluster.url), 3, runs) as group:
        sockets = [daemon.socket_path for daemon in group]
        texts = [f"s{i}" for i in range(500)]
        threads = await post_all(sockets, "slow", texts)
        victim = group[0]
        victim_pid = str(victim.process.pid)
        await asyncio.to_thread(_wait_for_runs_by, runs, victim_pid)
        assert await kill_9(victim) == -signal.SIGKILL
        replies = await collect_all(sockets[1:], threads)
        assert texts_of(replies) == texts
        ran = runs_of(runs)
        assert set(ran) == set(texts)
        duplicates = sum(count - 1 for count in ran.values())
        redelivered = [line for line in runs.read_text().splitlines() if line.split()[1] != "1"]
        assert len(redelivered) == duplicates  # every second run says it is one (delivery_attempt 2)
        assert duplicates > 0, "the killed daemon was handling hops; they must have run again"
        print(f"duplicate handler runs after kill -9: {duplicates} of {len(texts)}")
        counted = sum(_metric(daemon, 'xml_pipeline_redelivered_total{listener="slow"}') for daemon in group[1:])
        assert counted >= duplicates  # every run again was a claimed hop, and /metrics counts each claim
        assert conversation_keys(redis_for_cluster) == []
        for daemon in group[1:]:
            assert await asyncio.to_thread(daemon.stop) == 0


def _wait_for_runs_by(runs: Path, pid: str, timeout: float = 30) -> None:
    """Until the daemon ``pid`` has started handling hops (its handler runs are written down)."""

    def handled() -> bool:
        return runs.exists() and any(line.split()[2] == pid for line in runs.read_text().splitlines())

    if not wait_until(handled, timeout):
        raise AssertionError(f"daemon {pid} never handled a hop")


async def test_every_daemon_killed_then_one_started_handles_every_accepted_message(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.log"
    with short_directory() as directory:
        organism = cluster_organism(directory, redis_for_cluster.url)
        texts = [f"k{i}" for i in range(300)]
        with daemons(organism, 2, runs) as group:
            threads = await post_all([daemon.socket_path for daemon in group], "slow", texts)
            for daemon in group:
                await kill_9(daemon)
        with running_daemon(organism, env={RUNS_FILE: str(runs)}) as survivor:
            replies = await collect_all([survivor.socket_path], threads)
            assert await asyncio.to_thread(survivor.stop) == 0
    assert texts_of(replies) == texts
    assert set(runs_of(runs)) == set(texts)


async def test_a_handler_that_kills_its_daemon_ends_in_the_dead_letter_stream(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    """max_deliveries 2: the poison kills two daemons; the third dead-letters it and tells the sender.

    Clients talk to a door daemon that serves the other traffic (echo) and not the poisoned listener, so
    that no answer is cut off by a daemon the poison kills. (Another hop of the poisoned listener could
    be held by both daemons it kills, and would count those deliveries too.)
    """
    runs = tmp_path / "runs.log"
    with short_directory() as directory:
        organism = cluster_organism(directory, redis_for_cluster.url, max_deliveries=2)
        env = {RUNS_FILE: str(runs), CURE_FILE: str(runs.with_suffix(".cured"))}
        with (
            contextlib.ExitStack() as stack,
            running_daemon(organism, "--listeners", "echo", env=env) as door,
        ):
            group = [
                stack.enter_context(running_daemon(organism, "--listeners", "poisoned", env=env)) for _ in range(3)
            ]
            [poison_thread] = await post_all([door.socket_path], "poisoned", ["poison"])
            ordinary = await post_all([door.socket_path], "echo", [f"p{i}" for i in range(30)])
            survivors = await asyncio.to_thread(_wait_for_deaths, group, 2)
            live = [door.socket_path]
            [poison_replies] = await collect_all(live, [poison_thread])
            ordinary_replies = await collect_all(live, ordinary)
            assert texts_of([poison_replies]) == ["error:dead-letter"]
            assert texts_of(ordinary_replies) == [f"p{i}" for i in range(30)]
            assert runs_of(runs)["poison"] == 2
            lettered = sum(_metric(d, 'xml_pipeline_dead_lettered_total{listener="poisoned"}') for d in survivors)
            assert lettered == 1
            listed = await asyncio.to_thread(cli, "dlq", "list", "-o", str(organism))
            assert listed.returncode == 0, listed.stderr
            assert "poisoned" in listed.stdout
            assert "deliveries 2" in listed.stdout
            runs.with_suffix(".cured").touch()  # the operator fixed the handler; the letter may go again
            letter_id = listed.stdout.split()[0]
            replayed = await asyncio.to_thread(cli, "dlq", "replay", letter_id, "-o", str(organism))
            assert replayed.returncode == 0, replayed.stderr
            [after_replay] = await collect_all(live, [poison_thread])
            assert texts_of([after_replay]) == ["poison"]  # answered on the same thread
            emptied = await asyncio.to_thread(cli, "dlq", "list", "-o", str(organism))
            assert emptied.stdout.strip() == ""
            for daemon in [*survivors, door]:
                assert await asyncio.to_thread(daemon.stop) == 0


def _wait_for_deaths(group: list[DaemonProcess], deaths: int, timeout: float = 60) -> list[DaemonProcess]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [daemon for daemon in group if daemon.process.poll() is not None]
        if len(dead) >= deaths:
            return [daemon for daemon in group if daemon.process.poll() is None]
        time.sleep(0.05)
    raise AssertionError("the poison did not kill the daemons it reached")


async def test_redis_restarted_during_traffic_loses_nothing_accepted(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.log"
    with short_directory() as directory, daemons(cluster_organism(directory, redis_for_cluster.url), 2, runs) as group:
        sockets = [daemon.socket_path for daemon in group]
        before = await post_all(sockets, "slow", [f"b{i}" for i in range(200)])
        redis_for_cluster.stop()
        refused = await _post_while_down(sockets[0])
        assert refused == 503
        redis_for_cluster.start()
        after = await post_all(sockets, "slow", [f"a{i}" for i in range(100)])
        replies = await collect_all(sockets, before + after)
        assert texts_of(replies) == [f"b{i}" for i in range(200)] + [f"a{i}" for i in range(100)]
        for daemon in group:
            assert await asyncio.to_thread(daemon.stop) == 0


async def _post_while_down(socket_path: Path) -> int:
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post("http://daemon/messages", data=envelope("echo", "down")) as answer,
    ):
        body = await answer.json()
        assert body["error"]["code"] == "backend-unavailable", body
        return answer.status


async def test_a_1000_item_buffer_survives_a_daemon_killed_midway(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    """The coordinator's daemon serves system.buffer; the items run on it and on a second daemon, which is killed."""
    runs = tmp_path / "runs.log"
    with short_directory() as directory:
        organism = cluster_organism(directory, redis_for_cluster.url)
        env = {RUNS_FILE: str(runs)}
        with (
            running_daemon(organism, "--listeners", "fanout,system.buffer,slow", env=env) as coordinator,
            running_daemon(organism, "--listeners", "slow", env=env) as helper,
        ):
            [thread] = await post_all([coordinator.socket_path], "fanout", ["slow"], count=1000)
            await asyncio.to_thread(_wait_for_runs_by, runs, str(helper.process.pid))
            await kill_9(helper)
            [replies] = await collect_all([coordinator.socket_path], [thread], timeout=120)
            [summary] = texts_of([replies])
            assert summary == "1000/1000 ok; in order: True; failures: []"
            assert set(runs_of(runs)) == {f"item{i}" for i in range(1000)}
            assert await asyncio.to_thread(coordinator.stop) == 0


async def test_a_buffer_whose_coordinating_daemon_dies_runs_again_on_another(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    """Decided: the run is a hop like any other, so a live daemon claims it and runs it again from the start."""
    runs = tmp_path / "runs.log"
    with short_directory() as directory:
        organism = cluster_organism(directory, redis_for_cluster.url)
        env = {RUNS_FILE: str(runs)}
        with (
            running_daemon(organism, "--listeners", "fanout,system.buffer", env=env) as first,
            running_daemon(organism, "--listeners", "slow", env=env) as workers,
        ):
            [thread] = await post_all([first.socket_path], "fanout", ["slow"], count=300)
            await asyncio.to_thread(_wait_for_runs_by, runs, str(workers.process.pid))
            await kill_9(first)
            with running_daemon(organism, "--listeners", "fanout,system.buffer", env=env) as second:
                [replies] = await collect_all([second.socket_path], [thread], timeout=120)
                assert await asyncio.to_thread(second.stop) == 0
            assert await asyncio.to_thread(workers.stop) == 0
    [summary] = texts_of([replies])
    assert summary == "300/300 ok; in order: True; failures: []"
    assert set(runs_of(runs)) == {f"item{i}" for i in range(300)}


async def test_a_collect_false_buffer_survives_its_coordinating_daemon(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    """Its caller hears `dispatched` at once; the run is stored as a conversation of its own, so when its
    daemon dies a live one claims it and runs it again from the start, as any run."""
    runs = tmp_path / "runs.log"
    with short_directory() as directory:
        organism = cluster_organism(directory, redis_for_cluster.url)
        env = {RUNS_FILE: str(runs)}
        with (
            running_daemon(organism, "--listeners", "dispatcher,system.buffer", env=env) as first,
            running_daemon(organism, "--listeners", "slow", env=env) as workers,
        ):
            [thread] = await post_all([first.socket_path], "dispatcher", ["slow"], count=300)
            [replies] = await collect_all([first.socket_path], [thread], timeout=60)
            assert texts_of([replies]) == ["dispatched 300"]
            await asyncio.to_thread(_wait_for_runs_by, runs, str(workers.process.pid))
            await kill_9(first)
            with running_daemon(organism, "--listeners", "system.buffer", env=env) as second:
                await asyncio.to_thread(_wait_for_all_runs, runs, 300)
                assert await asyncio.to_thread(second.stop) == 0
            assert await asyncio.to_thread(workers.stop) == 0
    assert set(runs_of(runs)) == {f"item{i}" for i in range(300)}


def _wait_for_all_runs(runs: Path, count: int, timeout: float = 90) -> None:
    """Until ``count`` different items have been handled (written down by the handlers of any daemon)."""
    if not wait_until(lambda: len(runs_of(runs)) >= count, timeout):
        raise AssertionError(f"only {len(runs_of(runs))} of {count} items were handled")


async def test_send_whose_daemon_dies_during_the_wait_says_where_another_daemon_has_its_replies(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    """``send`` stores first and then waits, so a killed daemon leaves it knowing the thread to ask elsewhere.

    The kill follows the handler's start, which follows the store but may come before the door's answer left
    it (another daemon may handle the hop at once, on a loaded machine): then ``send`` rightly knows no
    thread, and the scenario runs again, at most three times."""
    runs = tmp_path / "runs.log"
    with short_directory() as directory:
        organism = cluster_organism(directory, redis_for_cluster.url)
        env = {RUNS_FILE: str(runs)}
        for attempt in range(1, 4):
            text = f"x{attempt}"
            with running_daemon(organism, env=env) as first, running_daemon(organism, env=env) as second:
                sending = asyncio.create_task(
                    asyncio.to_thread(
                        cli, "send", "--socket", str(first.socket_path), "slow", f"<Ping><text>{text}</text></Ping>"
                    )
                )
                await asyncio.to_thread(_wait_for_all_runs, runs, attempt)
                await kill_9(first)
                sent = await sending
                assert sent.returncode == 4, sent.stderr
                match = re.search(r"accepted on thread ([0-9a-f-]{36})", sent.stderr)
                if match is None and attempt < 3:
                    assert "cannot talk to the daemon" in sent.stderr, sent.stderr
                    continue  # killed before its answer to the store left it
                assert match is not None, sent.stderr
                [replies] = await collect_all([second.socket_path], [match.group(1)], timeout=60)
                assert texts_of([replies]) == [text]
                return


def _metric(daemon: DaemonProcess, series: str) -> float:
    for line in daemon.client.metrics().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def test_status_shows_every_live_daemon_and_each_listeners_backlog(
    redis_for_cluster: RedisServer, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.log"
    with short_directory() as directory, daemons(cluster_organism(directory, redis_for_cluster.url), 2, runs) as group:
        threads = await post_all([group[0].socket_path], "slow", [f"q{i}" for i in range(20)])
        cluster = group[1].client.status()["cluster"]
        assert {d["pid"] for d in cluster["daemons"]} == {d.process.pid for d in group}
        assert set(cluster["listeners"]) >= {"echo", "slow", "poisoned", "system.buffer", "system.sequence"}
        assert cluster["dead_letters"] == 0
        shown = await asyncio.to_thread(cli, "status", "--socket", str(group[1].socket_path))
        assert shown.returncode == 0, shown.stderr
        assert "cluster: 2 live daemon(s)" in shown.stdout
        assert "(this one)" in shown.stdout
        await collect_all([group[0].socket_path], threads)
        for daemon in group:
            assert await asyncio.to_thread(daemon.stop) == 0


async def test_the_example_organism_behaves_the_same_in_durable_mode(redis_for_cluster: RedisServer) -> None:
    """send, errors and SIGTERM as on one daemon, with every hop going through Redis Streams."""
    with short_directory() as directory:
        organism = directory / "organism.yaml"
        write_organism(organism)
        organism.write_text(
            organism.read_text()
            + f"\nbackend:\n  type: redis\n  redis_url: {redis_for_cluster.url}\n  delivery: at-least-once\n"
        )
        with running_daemon(organism) as daemon:
            socket_path = str(daemon.socket_path)
            sent = await asyncio.to_thread(
                cli, "send", "--socket", socket_path, "greeter", "<Greeting><name>Ada</name></Greeting>"
            )
            assert sent.returncode == 0, sent.stderr
            assert "HELLO, ADA!" in sent.stdout
            refused = await asyncio.to_thread(cli, "send", "--socket", socket_path, "greeter", "<Nope/>")
            assert refused.returncode == 1
            assert "payload-invalid" in refused.stderr
            crunched = await asyncio.to_thread(
                cli, "send", "--socket", socket_path, "cruncher", "<Crunch><text>abc</text><rounds>3</rounds></Crunch>"
            )
            assert crunched.returncode == 0, crunched.stderr
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.process.wait, 30) == 0
        assert conversation_keys(redis_for_cluster) == []
