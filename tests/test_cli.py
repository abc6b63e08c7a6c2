"""The xml-pipeline command, run as a real subprocess."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT
from tests.daemon_support import running_daemon, short_directory, write_organism
from tests.test_config import BROKEN
from tests.test_daemon import SLOW_LISTENERS, _envelope
from xml_pipeline import __version__
from xml_pipeline.message.envelope import read_envelope
from xml_pipeline.message.safe_xml import parse_untrusted

CLI = [sys.executable, "-m", "xml_pipeline"]


def cli(*args: str, stdin: str = "", cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


def test_version_and_help() -> None:
    assert cli("--version").stdout.strip() == f"xml-pipeline, version {__version__}"
    result = cli("--help")
    assert result.returncode == 0
    assert "check" in result.stdout
    assert "run" in result.stdout


def test_check_accepts_the_example_organism() -> None:
    result = cli("check", "organism.yaml")
    assert (result.returncode, result.stdout.strip()) == (
        0,
        "organism.yaml: organism 'hello' is valid (4 listeners, 2 open to clients)",
    )


def test_check_lists_every_problem_and_exits_2() -> None:
    result = cli("check", str(BROKEN))
    assert result.returncode == 2
    assert "18 problem(s)" in result.stderr
    assert f"{BROKEN}:14: listener 'greeter' is defined twice" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_stdin_answers_each_message_and_exits_1_when_some_were_refused() -> None:
    messages = "\n".join(
        [
            "greeter <Greeting><name>Ada</name><excitement>2</excitement></Greeting>",
            "greeter <Nope/>",
            "this is not xml",
            "",
        ]
    )
    result = cli("run", "organism.yaml", "--stdin", stdin=messages)
    assert result.returncode == 1, result.stderr  # as send: a SystemError reply means exit 1
    assert "# 2 message(s) got a SystemError" in result.stderr
    replies = [read_envelope(parse_untrusted(line.encode())) for line in result.stdout.splitlines()]
    payloads = sorted(
        (reply.payload.tag, reply.payload.findtext("text") or reply.payload.findtext("code")) for reply in replies
    )
    assert payloads == [
        ("GreetingReply", "HELLO, ADA!!"),
        ("SystemError", "malformed-xml"),
        ("SystemError", "payload-invalid"),
    ]
    assert "pump started organism=hello" in result.stderr
    assert "pump stopped organism=hello drained=True" in result.stderr


def test_run_with_stdin_exits_0_when_every_message_was_served() -> None:
    result = cli("run", "organism.yaml", "--stdin", stdin="greeter <Greeting><name>Ada</name></Greeting>\n")
    assert result.returncode == 0, result.stderr
    assert "HELLO, ADA!" in result.stdout


def test_send_during_a_drain_says_the_daemon_is_stopping() -> None:
    """While draining the daemon answers a plain {"error": ...}, which send must print, not crash on."""
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", SLOW_LISTENERS)
        with running_daemon(organism, "--drain-timeout", "30") as daemon:
            held = daemon.client.request("POST", "/messages", body=_envelope("hanger", "<Ping><text>x</text></Ping>"))
            assert held.status == 202
            daemon.signal(signal.SIGTERM)
            daemon.notify.expect("STOPPING=1")
            sent = cli("send", "--socket", str(daemon.socket_path), "greeter", "<Greeting><name>Ada</name></Greeting>")
            assert sent.returncode == 1, sent.stderr
            assert "refused (shutting-down): the daemon is stopping" in sent.stderr
            assert "Traceback" not in sent.stderr
            daemon.process.kill()


def test_the_wheel_ships_only_the_xml_pipeline_package(tmp_path: Path) -> None:
    """A top-level ``workers`` package in the wheel would hide a user's own after a normal install."""
    source = tmp_path / "source"  # a clean copy: an in-tree build/ directory would leak old contents
    for directory in ("xml_pipeline", "workers"):
        shutil.copytree(ROOT / directory, source / directory, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / file, source / file)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("xml_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/", 1)[0] for name in archive.namelist()}
    assert {name for name in top_level if not name.startswith("xml_pipeline")} == set()
    assert "xml_pipeline" in top_level


def test_send_and_status_without_a_daemon_say_so_plainly(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "nobody.sock")
    for args in (
        ["send", "--socket", socket_path, "greeter", "<Greeting><name>x</name></Greeting>"],
        ["status", "--socket", socket_path],
    ):
        result = cli(*args)
        assert result.returncode == 4, result
        assert "no daemon is listening on" in result.stderr
        assert "is it running?" in result.stderr
        assert "Traceback" not in result.stderr


def test_send_refuses_bad_input_before_calling_the_daemon(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "nobody.sock")
    cases = {
        ("greeter", "<Greeting><name>x</Greeting>"): "PAYLOAD is not usable XML",
        ("not a name!", "<Greeting/>"): "is not a listener name",
        ("greeter", "<!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>"): "DOCTYPE",
    }
    for (target, payload), message in cases.items():
        result = cli("send", "--socket", socket_path, target, payload)
        assert result.returncode == 2, result
        assert message in result.stderr
        assert "Traceback" not in result.stderr
    thread = cli("send", "--socket", socket_path, "--thread", "nope", "greeter", "<G/>")
    assert (thread.returncode, "is not a thread id" in thread.stderr) == (2, True)


def test_run_refuses_a_non_loopback_tcp_address() -> None:
    result = cli("run", "organism.yaml", "--tcp", "10.1.2.3:8470")
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_run_with_a_missing_organism_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("run", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "cannot read the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_daemon_on_the_same_socket_refuses_to_start() -> None:
    from tests.daemon_support import running_daemon

    with running_daemon(ROOT / "organism.yaml") as daemon:
        second = cli("run", "organism.yaml", "--socket", str(daemon.socket_path))
        assert second.returncode == 1
        assert f"another daemon is already listening on {daemon.socket_path}" in second.stderr
        assert daemon.client.request("GET", "/healthz").status == 200
