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
    assert (result.returncode, result.stdout.strip()) == (0, "organism.yaml: organism 'hello' is valid (3 listeners)")


def test_check_lists_every_problem_and_exits_2() -> None:
    result = cli("check", str(BROKEN))
    assert result.returncode == 2
    assert "19 problem(s)" in result.stderr
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
