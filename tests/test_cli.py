"""The xml-pipeline command, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.test_config import BROKEN
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


def test_run_with_stdin_answers_each_message_and_exits_cleanly() -> None:
    messages = "\n".join(
        [
            "greeter <Greeting><name>Ada</name><excitement>2</excitement></Greeting>",
            "greeter <Nope/>",
            "this is not xml",
            "",
        ]
    )
    result = cli("run", "organism.yaml", "--stdin", stdin=messages)
    assert result.returncode == 0, result.stderr
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
