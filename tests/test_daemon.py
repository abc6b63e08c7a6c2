"""The daemon as operators run it: a real subprocess, its socket, its signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT
from tests.daemon_support import (
    DaemonProcess,
    cli,
    free_loopback_port,
    running_daemon,
    short_directory,
    wait_until,
    write_organism,
)
from xml_pipeline.daemon.client import DaemonClient
from xml_pipeline.daemon.service import _bind_unix_socket
from xml_pipeline.message.envelope import read_envelope
from xml_pipeline.message.safe_xml import parse_untrusted

EXAMPLE = ROOT / "organism.yaml"
GREETING = "<Greeting><name>Ada</name><excitement>2</excitement></Greeting>"
ECHO_LISTENER = """
  - name: echo
    payload_class: tests.support.Ping
    handler: tests.support.echo
    ingress: true
    peers: []
"""


def test_send_gets_the_reply_and_status_and_metrics_show_the_traffic() -> None:
    with running_daemon(EXAMPLE) as daemon:
        sent = cli("send", "--socket", str(daemon.socket_path), "greeter", GREETING)
        assert sent.returncode == 0, sent.stderr
        (line,) = sent.stdout.splitlines()
        reply = read_envelope(parse_untrusted(line.encode()))
        assert (reply.sender, reply.payload.findtext("text")) == ("greeter", "HELLO, ADA!!")
        assert f"thread {reply.thread}: 1 reply" in sent.stderr

        refused = cli("send", "--socket", str(daemon.socket_path), "greeter", "<Nope/>")
        assert refused.returncode == 1
        assert "refused (payload-invalid)" in refused.stderr

        shown = cli("status", "--socket", str(daemon.socket_path))
        assert shown.returncode == 0, shown.stderr
        assert "organism hello: accepting messages" in shown.stdout
        assert "greeter" in shown.stdout
        status = json.loads(cli("status", "--json", "--socket", str(daemon.socket_path)).stdout)
        assert [listener["name"] for listener in status["listeners"]] == [
            "greeter",
            "shouter",
            "exclaimer",
            "cruncher",
            "system.sequence",
            "system.buffer",
        ]
        assert (status["conversations"], status["threads"], status["queue_depth"], status["in_flight"]) == (0, 0, 0, 0)
        assert status["uptime_seconds"] > 0

        metrics = daemon.client.metrics()
        assert 'xml_pipeline_messages_in_total{listener="greeter"} 2.0' in metrics
        assert 'xml_pipeline_messages_out_total{listener="exclaimer"} 1.0' in metrics
        assert 'xml_pipeline_errors_total{code="payload-invalid"} 1.0' in metrics
        assert 'xml_pipeline_handler_seconds_count{listener="shouter"} 2.0' in metrics
        assert 'xml_pipeline_ingress_total{outcome="accepted"} 1.0' in metrics
        assert "xml_pipeline_queue_depth 0.0" in metrics
        assert daemon.stop() == 0
    assert not daemon.socket_path.exists()


def test_http_interface_answers_bad_requests_with_clear_4xx() -> None:
    port = free_loopback_port()
    with running_daemon(EXAMPLE, "--tcp", f"127.0.0.1:{port}") as daemon:
        over_tcp = DaemonClient(tcp=("127.0.0.1", port))
        assert over_tcp.request("GET", "/healthz").json()["status"] == "ok"
        client = daemon.client
        cases = {
            b"<not xml": (400, "malformed-xml"),
            b"<a/>": (400, "envelope-invalid"),
            _envelope("nobody", GREETING): (404, "unknown-target"),
            _envelope("greeter", "<Greeting><nom>x</nom></Greeting>"): (422, "payload-invalid"),
            _envelope("greeter", f"<Greeting><name>{'x' * 1_100_000}</name></Greeting>"): (413, "too-large"),
        }
        for body, (status, code) in cases.items():
            answer = client.request("POST", "/messages", body=body)
            assert answer.status == status, (body[:40], answer.body[:200])
            if code is not None:
                assert answer.json()["error"]["code"] == code
        assert client.request("GET", f"/threads/{uuid.uuid4()}/replies").status == 404
        assert client.request("POST", "/messages?wait=sometimes", body=b"<a/>").status == 400
        accepted = client.request("POST", "/messages", body=_envelope("greeter", GREETING))
        assert accepted.status == 202
        thread = accepted.json()["thread"]
        collected = client.request("GET", f"/threads/{thread}/replies?wait=end&timeout=10").json()
        assert collected["ended"] is True
        assert "HELLO, ADA!!" in collected["replies"][0]
        assert client.request("GET", f"/threads/{thread}/replies").status == 404  # collected: forgotten
        assert daemon.stop() == 0


def test_systemd_sees_ready_watchdog_reloading_and_stopping() -> None:
    with running_daemon(EXAMPLE, env={"WATCHDOG_USEC": "200000"}) as daemon:
        daemon.notify.expect("WATCHDOG=1")
        daemon.signal(signal.SIGHUP)
        reloading = daemon.notify.expect("RELOADING=1")
        assert any(field.startswith("MONOTONIC_USEC=") for field in reloading.split("\n"))
        daemon.notify.expect("READY=1")
        daemon.signal(signal.SIGTERM)
        daemon.notify.expect("STOPPING=1")
        assert daemon.stop() == 0


def test_sighup_with_a_valid_edit_changes_behaviour() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml")
        with running_daemon(organism) as daemon:
            before = cli("send", "--socket", str(daemon.socket_path), "echo", "<Ping><text>hi</text></Ping>")
            assert before.returncode == 1
            assert "unknown-target" in before.stderr
            write_organism(organism, ECHO_LISTENER)
            daemon.signal(signal.SIGHUP)
            daemon.notify.expect("RELOADING=1")
            daemon.notify.expect("READY=1")
            after = cli("send", "--socket", str(daemon.socket_path), "echo", "<Ping><text>hi</text></Ping>")
            assert after.returncode == 0, after.stderr
            assert "<Pong><text>hi</text></Pong>" in after.stdout
            assert "echo" in [listener["name"] for listener in daemon.client.status()["listeners"]]
            assert 'xml_pipeline_reloads_total{result="ok"} 1.0' in daemon.client.metrics()
            assert daemon.stop() == 0


def test_sighup_with_a_broken_edit_keeps_the_old_organism_answering() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml")
        with running_daemon(organism) as daemon:
            organism.write_text("organism:\n  name: hello\n  colour: red\nlisteners:\n  - name: greeter\n")
            daemon.signal(signal.SIGHUP)
            daemon.notify.expect("RELOADING=1")
            daemon.notify.expect("READY=1")
            still = cli("send", "--socket", str(daemon.socket_path), "greeter", GREETING)
            assert still.returncode == 0, still.stderr
            assert "HELLO, ADA!!" in still.stdout
            log = daemon.log()
            assert "reload refused: " in log
            assert "organism.yaml:3: organism: unknown key 'colour'" in log
            assert "organism.yaml:5: listeners[0]: 'payload_class' is missing" in log
            assert "the previous organism keeps running" in log
            assert 'xml_pipeline_reloads_total{result="failed"} 1.0' in daemon.client.metrics()
            assert daemon.stop() == 0


SLOW_LISTENERS = """
  - name: slow
    payload_class: tests.support.Ping
    handler: tests.support.slow_echo
    ingress: true
    max_concurrency: 1000
  - name: hanger
    payload_class: tests.support.Ping
    handler: tests.support.hangs
    ingress: true
    timeout_seconds: 120
    max_concurrency: 1000
"""
ROOMY_PUMP = "pump:\n  max_in_flight: 1000\n  queue_size: 2000\n"


async def _post_all(socket_path: Path, target: str, count: int) -> list[str]:
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(index: int) -> str:
            body = _envelope(target, f"<Ping><text>m{index}</text></Ping>")
            async with session.post("http://daemon/messages", data=body) as answer:
                assert answer.status == 202, await answer.text()
                return str((await answer.json())["thread"])

        return list(await asyncio.gather(*(post(i) for i in range(count))))


async def _collect_all(socket_path: Path, threads: list[str]) -> list[list[str]]:
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def collect(thread: str) -> list[str]:
            url = f"http://daemon/threads/{thread}/replies?wait=end&timeout=30"
            async with session.get(url) as answer:
                assert answer.status == 200, await answer.text()
                body = await answer.json()
                assert body["ended"] is True
                return list(body["replies"])

        return list(await asyncio.gather(*(collect(thread) for thread in threads)))


async def test_sigterm_with_500_in_flight_answers_every_accepted_message() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", SLOW_LISTENERS, pump=ROOMY_PUMP)
        with running_daemon(organism) as daemon:
            threads = await _post_all(daemon.socket_path, "slow", 500)
            daemon.signal(signal.SIGTERM)
            daemon.notify.expect("STOPPING=1")
            replies = await _collect_all(daemon.socket_path, threads)
            assert await asyncio.to_thread(daemon.stop) == 0
            assert "drained=True" in daemon.log()
    kinds = Counter(_kind(reply) for thread_replies in replies for reply in thread_replies)
    assert [len(r) for r in replies] == [1] * 500
    assert kinds == {"Pong": 500}


async def test_sigterm_past_the_drain_deadline_reports_what_was_cut_short() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", SLOW_LISTENERS, pump=ROOMY_PUMP)
        with running_daemon(organism, "--drain-timeout", "0.2") as daemon:
            threads = await _post_all(daemon.socket_path, "hanger", 50)
            daemon.signal(signal.SIGTERM)
            replies = await _collect_all(daemon.socket_path, threads)
            assert await asyncio.to_thread(daemon.stop) == 0
            assert "50 message(s) were cut short" in daemon.log()
    assert [[_kind(reply) for reply in r] for r in replies] == [["SystemError:shutting-down"]] * 50


def _envelope(target: str, payload: str) -> bytes:
    return (
        (
            '<message xmlns="https://xml-pipeline.org/ns/envelope/v1"><meta><from>console</from>'
            f"<to>{target}</to><thread>{uuid.uuid4()}</thread></meta>{payload.replace('<', '<', 1)}</message>"
        )
        .encode()
        .replace(b"><Greeting>", b'><Greeting xmlns="">')
        .replace(b"><Ping>", b'><Ping xmlns="">')
    )


def _kind(envelope: str) -> str:
    payload = read_envelope(parse_untrusted(envelope.encode())).payload
    return f"SystemError:{payload.findtext('code')}" if payload.tag == "SystemError" else str(payload.tag)


def test_a_repeated_sigterm_during_the_drain_does_not_cut_it_short() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", SLOW_LISTENERS, pump=ROOMY_PUMP)
        with running_daemon(organism) as daemon:
            accepted = daemon.client.request("POST", "/messages", body=_envelope("slow", "<Ping><text>x</text></Ping>"))
            thread = accepted.json()["thread"]
            daemon.signal(signal.SIGTERM)
            daemon.notify.expect("STOPPING=1")
            daemon.process.send_signal(signal.SIGTERM)
            collected = daemon.client.request("GET", f"/threads/{thread}/replies?wait=end&timeout=10").json()
            assert daemon.stop() == 0
    assert [_kind(reply) for reply in collected["replies"]] == ["Pong"]


def test_overload_and_stopping_answer_503_with_retry_after() -> None:
    with short_directory() as directory:
        tight = "pump:\n  max_in_flight: 1\n  queue_size: 1\n"
        organism = write_organism(directory / "organism.yaml", SLOW_LISTENERS, pump=tight)
        with running_daemon(organism, "--drain-timeout", "0.2") as daemon:
            body = _envelope("hanger", "<Ping><text>x</text></Ping>")
            # one runs, one waits for a slot in the dispatcher's hand, one fills the queue
            statuses = [daemon.client.request("POST", "/messages", body=body).status for _ in range(4)]
            assert statuses == [202, 202, 202, 503]
            refused = daemon.client.request("POST", "/messages", body=body)
            assert refused.json()["error"]["code"] == "overload"
            assert refused.json()["error"]["retry_allowed"] is True
            daemon.signal(signal.SIGINT)  # SIGINT stops the daemon exactly like SIGTERM
            daemon.notify.expect("STOPPING=1")
            assert daemon.client.request("GET", "/healthz").status == 503
            assert daemon.client.request("POST", "/messages", body=body).status == 503
            assert daemon.stop() == 0


def test_socket_is_group_accessible_only() -> None:
    with running_daemon(EXAMPLE) as daemon:
        assert daemon.socket_path.is_socket()
        assert daemon.socket_path.stat().st_mode & 0o777 == 0o660
        assert daemon.stop() == 0


@pytest.mark.parametrize(("owner", "mode"), [(os.getuid(), 0o777), (os.getuid(), 0o770), (1, 0o700)])
def test_run_refuses_a_socket_directory_someone_else_controls(owner: int, mode: int) -> None:
    with short_directory() as directory:
        shared = directory / "shared"
        shared.mkdir()
        shared.chmod(mode)
        os.chown(shared, owner, -1)
        refused = cli("run", str(EXAMPLE), "--socket", str(shared / "d.sock"))
        assert refused.returncode == 1
        assert f"the socket directory {shared}" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert list(shared.iterdir()) == []


def test_run_refuses_a_default_socket_directory_made_in_advance_by_another_user() -> None:
    with short_directory() as directory:
        planted = directory / "xml-pipeline"  # where $XDG_RUNTIME_DIR sends the default socket
        planted.mkdir()
        planted.chmod(0o777)
        environment = {key: value for key, value in os.environ.items() if key != "RUNTIME_DIRECTORY"}
        refused = cli("run", str(EXAMPLE), env={**environment, "XDG_RUNTIME_DIR": str(directory)})
        assert refused.returncode == 1
        assert "is writable by others (mode 0777)" in refused.stderr
        assert list(planted.iterdir()) == []


def test_a_socket_directory_the_daemon_makes_is_0750_whatever_the_umask() -> None:
    with short_directory() as directory:
        previous = os.umask(0o077)
        try:
            bound = _bind_unix_socket(directory / "made" / "d.sock")
        finally:
            os.umask(previous)
        bound.close()
        assert (directory / "made").stat().st_mode & 0o777 == 0o750


def test_run_never_deletes_a_file_that_is_not_a_socket() -> None:
    with short_directory() as directory:
        precious = directory / "notes.txt"
        precious.write_text("keep me")
        refused = cli("run", str(EXAMPLE), "--socket", str(precious))
        assert refused.returncode == 1
        assert f"{precious} exists and is not a socket; refusing to replace it" in refused.stderr
        assert precious.read_text() == "keep me"


def test_json_logs_are_one_object_per_line() -> None:
    with running_daemon(EXAMPLE, "--log-json") as daemon:
        cli("send", "--socket", str(daemon.socket_path), "greeter", "<Nope/>")
        assert daemon.stop() == 0
        lines = daemon.log().splitlines()
    records = [json.loads(line) for line in lines]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    failure = next(record for record in records if record["level"] == "warning")
    assert "listener=greeter" in failure["msg"]
    assert "thread=" in failure["msg"]


def test_uncollected_replies_are_bounded_in_bytes_and_new_messages_wait_for_collection() -> None:
    """Replies nobody collects cannot grow the daemon's memory past pump.max_reply_bytes."""
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump="pump:\n  max_reply_bytes: 2000\n")
        with running_daemon(organism) as daemon:
            client = daemon.client
            threads = []
            while True:
                answer = client.request("POST", "/messages", body=_envelope("greeter", GREETING))
                if answer.status != 202:
                    break
                threads.append(answer.json()["thread"])
                assert len(threads) < 50, "the reply budget never filled"
            assert answer.status == 503
            assert answer.json()["error"]["code"] == "overload"
            assert "bytes of replies are waiting to be collected" in answer.json()["error"]["message"]
            for thread in threads:
                collected = client.request("GET", f"/threads/{thread}/replies?wait=end&timeout=10").json()
                assert "HELLO, ADA" in collected["replies"][0]
            assert client.request("POST", "/messages", body=_envelope("greeter", GREETING)).status == 202
            assert daemon.stop() == 0


HANGING_UP_MID_BODY = (
    b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n<message",
    b"POST /messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n<message\r\n",
)


def _hang_up_mid_body(daemon: DaemonProcess, clients: int) -> None:
    """``clients`` connections that send the headers and half a body, then close; return once the daemon saw each."""
    for number in range(clients):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(daemon.socket_path))
            client.sendall(HANGING_UP_MID_BODY[number % 2])
    assert wait_until(lambda: daemon.log().count("Connection lost") >= clients, timeout=30), daemon.log()


def test_json_logs_stay_json_when_clients_hang_up_mid_body() -> None:
    with running_daemon(EXAMPLE, "--log-json") as daemon:
        _hang_up_mid_body(daemon, 10)
        assert daemon.stop() == 0
        records = [json.loads(line) for line in daemon.log().splitlines()]
    assert sum("Connection lost" in record["msg"] for record in records) == 10


def test_a_client_hanging_up_mid_body_is_one_info_line_without_traceback() -> None:
    with running_daemon(EXAMPLE) as daemon:
        _hang_up_mid_body(daemon, 20)
        assert daemon.client.request("GET", "/healthz").status == 200
        assert daemon.stop() == 0
        log = daemon.log()
    assert "Traceback" not in log
    assert " ERROR " not in log
    assert log.count("INFO xml_pipeline.daemon a client went away before its body arrived (Connection lost)") == 20
