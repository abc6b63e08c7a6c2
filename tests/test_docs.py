"""The README and docs say what the code does: their examples run, their tables are complete."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.daemon_support import cli, free_loopback_port, running_daemon, write_organism
from tests.tls_support import make_pki
from workers.hello import GreetingReply
from xml_pipeline import ErrorCode, SystemErrorPayload
from xml_pipeline.config import loader
from xml_pipeline.memory.shared_backend import reset_shared_backend
from xml_pipeline.message.payload_codec import codec_for
from xml_pipeline.message_bus.thread_registry import reset_registry
from xml_pipeline.organism import Organism
from xml_pipeline.testing import running

README = (ROOT / "README.md").read_text()
ORGANISM_DOC = (ROOT / "docs" / "organism-yaml.md").read_text()
SYSTEMD_DOC = (ROOT / "docs" / "systemd.md").read_text()
REFERENCE_DOC = (ROOT / "docs" / "reference-api.md").read_text()


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def run_readme_blocks(count: int | None = None) -> dict[str, Any]:
    """Execute the README's Python blocks in order, as one module (dataclasses need a real one)."""
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    for block in blocks("python")[:count]:
        exec(compile(block, "README.md", "exec"), module.__dict__)
    return module.__dict__


def test_readme_python_examples_run() -> None:
    namespace = run_readme_blocks()
    assert "triage" in namespace


def test_reference_api_example_runs() -> None:
    """As in a fresh process: no registry or shared backend made before (earlier tests' pumps installed theirs)."""
    reset_registry()
    reset_shared_backend()
    (example,) = blocks("python", REFERENCE_DOC)
    exec(compile(example, "docs/reference-api.md", "exec"), {"__name__": "reference_example"})


def test_readme_ticket_xml_matches_the_ticket_contract() -> None:
    namespace = run_readme_blocks(1)
    ticket_xml = next(block for block in blocks("xml") if block.startswith("<Ticket>"))
    ticket = codec_for(namespace["Ticket"]).from_bytes(ticket_xml.strip().encode())
    assert ticket == namespace["Ticket"]("Disk full", namespace["Priority"].HIGH, ["ops"])


def test_readme_error_example_is_a_valid_system_error() -> None:
    error_xml = next(block for block in blocks("xml") if block.startswith("<SystemError>"))
    error = codec_for(SystemErrorPayload).from_bytes(error_xml.strip().encode())
    assert error.code is ErrorCode.UNKNOWN_TARGET


async def test_readme_envelope_example_is_answered(example_organism: Organism) -> None:
    envelope = next(block for block in blocks("xml") if block.startswith("<message"))
    async with running(example_organism) as pump:
        reply = await (await pump.inject(envelope.encode())).next_reply(5)
    assert reply.payload == GreetingReply("HELLO, ADA!")


def test_readme_send_example_gets_the_reply_it_shows() -> None:
    (line,) = [
        line for block in blocks("sh") for line in block.splitlines() if line.startswith(".venv/bin/xml-pipeline send ")
    ]
    command = shlex.split(line)
    assert command[0] == ".venv/bin/xml-pipeline"
    shown = next(block for block in blocks("xml") if "GreetingReply" in block)
    expected_payload = shown[shown.index("<GreetingReply>") : shown.index("</xp:message>")]
    with running_daemon(ROOT / "organism.yaml") as daemon:
        result = cli(*command[1:], "--socket", str(daemon.socket_path))
    assert result.returncode == 0, result.stderr
    assert expected_payload in result.stdout


def test_readme_curl_example_gets_the_greeting(tmp_path: Path) -> None:
    (script,) = [block for block in blocks("sh") if "curl --unix-socket" in block]
    with running_daemon(ROOT / "organism.yaml") as daemon:
        script = script.replace("/tmp/xml-pipeline-$(id -u)/hello.sock", str(daemon.socket_path))
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["accepted"] is True
    assert answer["ended"] is True
    assert "HELLO, ADA!" in answer["replies"][0]


def test_docs_link_to_files_that_exist() -> None:
    docs = ROOT / "docs"
    for text, base in ((README, ROOT), (ORGANISM_DOC, docs), (SYSTEMD_DOC, docs), (REFERENCE_DOC, docs)):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (base / target).exists(), target


def test_every_error_code_is_in_the_readme_table() -> None:
    for code in ErrorCode:
        assert f"| `{code.value}` |" in README, code


def test_every_organism_key_is_documented() -> None:
    keys = {key for section in loader._SECTIONS.values() for key in section} | set(loader._LISTENER_KEYS)
    for key in keys:
        assert f"| `{key}` |" in ORGANISM_DOC, key
    for section in [*loader._SECTIONS, "listeners"]:
        assert f"## `{section}`" in ORGANISM_DOC, section


def test_readme_two_commands_exist_and_ci_calls_the_test_one() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "make run " in README
    assert "make test " in README
    assert re.search(r"^run: ", makefile, flags=re.MULTILINE)
    assert re.search(r"^test: ", makefile, flags=re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_token_example_runs_against_a_tls_daemon(tmp_path: Path) -> None:
    """The README's token, send and curl lines, on 127.0.0.2 instead of 10.0.0.5 (nothing leaves the machine)."""
    (example,) = [block for block in blocks("sh") if "token add billing" in block]
    commands = example.replace("\\\n", "").splitlines()
    pki = make_pki(tmp_path, "127.0.0.2")
    address = f"127.0.0.2:{free_loopback_port()}"
    organism = write_organism(
        tmp_path / "organism.yaml",
        pump=f"auth:\n  tokens_file: tokens.json\ntls:\n  cert: {pki.server_cert}\n  key: {pki.server_key}\n",
    )
    assert cli("token", "add", "ops", "--listeners", "greeter", "-o", str(organism)).returncode == 0
    (tmp_path / "message.xml").write_text(
        '<message xmlns="https://xml-pipeline.org/ns/envelope/v1"><meta><from>billing</from><to>greeter</to>'
        '<thread>3f2a9c1e-0b7d-4e7a-9a51-6d2b8f1c0e42</thread></meta><Greeting xmlns=""><name>Ada</name></Greeting>'
        "</message>"
    )
    environment = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    with running_daemon(organism, "--tcp", address) as daemon:
        for command in commands:
            if command.startswith("systemctl reload"):
                daemon.signal(signal.SIGHUP)
                daemon.notify.expect("RELOADING=1")
                daemon.notify.expect("READY=1")
                continue
            shell = command.replace("10.0.0.5:8470", address).replace("ca.pem", str(pki.ca))
            done = subprocess.run(
                ["bash", "-c", shell], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, (command, done.stderr)
            if "send" in command or "curl" in command:
                assert "HELLO, ADA!" in done.stdout, (command, done.stdout)
        assert daemon.stop() == 0
