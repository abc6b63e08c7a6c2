"""Tokens: hashed in an owner-only file, edited by `xml-pipeline token`, checked at the door, reloaded on SIGHUP."""

from __future__ import annotations

import json
import signal
import stat
from pathlib import Path

import pytest

from tests.daemon_support import DaemonProcess, cli, running_daemon, short_directory, write_organism
from tests.support import envelope
from xml_pipeline.daemon.client import DaemonClient, DoorRefused
from xml_pipeline.daemon.tokens import TokenBook, TokenFileError, hash_token

GREETING = '<Greeting xmlns=""><name>Ada</name></Greeting>'
CRUNCH = '<Crunch xmlns=""><text>x</text></Crunch>'


def auth_section(*, require_on_socket: bool) -> str:
    return f"auth:\n  tokens_file: tokens.json\n  require_on_socket: {str(require_on_socket).lower()}\n"


def add_token(organism: Path, name: str, listeners: str) -> str:
    added = cli("token", "add", name, "--listeners", listeners, "-o", str(organism))
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


def test_the_file_keeps_only_hashes_and_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    book, token = TokenBook().with_client("billing", ["greeter"])
    book.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()
    assert json.loads(path.read_text())["clients"][0]["sha256"] == hash_token(token)
    loaded = TokenBook.load(path)
    client = loaded.identify(token)
    assert client is not None
    assert (client.name, client.listeners) == ("billing", frozenset({"greeter"}))
    assert loaded.identify(token + "x") is None
    assert loaded.without_client("billing").identify(token) is None


def test_a_tokens_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    TokenBook().save(path)
    path.chmod(0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        TokenBook.load(path)


def test_token_commands_add_list_revoke_and_check_the_names(tmp_path: Path) -> None:
    organism = write_organism(tmp_path / "organism.yaml", pump=auth_section(require_on_socket=False))
    token = add_token(organism, "billing", "greeter,cruncher")
    assert token.startswith("xpt_")
    listed = cli("token", "list", "-o", str(organism))
    assert listed.stdout.split("\t")[:2] == ["billing", "cruncher,greeter"]
    assert token not in listed.stdout
    assert cli("token", "add", "billing", "--listeners", "greeter", "-o", str(organism)).returncode == 2
    for refused_name in ("shouter", "system.x", "bad name"):
        assert cli("token", "add", refused_name, "--listeners", "greeter", "-o", str(organism)).returncode == 2
    unknown = cli("token", "add", "ops", "--listeners", "greeter,nobody", "-o", str(organism))
    assert (unknown.returncode, "unknown: nobody" in unknown.stderr) == (2, True)
    closed = cli("token", "add", "ops", "--listeners", "exclaimer", "-o", str(organism))
    assert closed.returncode == 0
    assert "exclaimer not open to clients" in closed.stderr
    assert cli("token", "revoke", "billing", "-o", str(organism)).returncode == 0
    assert "billing" not in cli("token", "list", "-o", str(organism)).stdout
    assert cli("token", "revoke", "billing", "-o", str(organism)).returncode == 2


def test_check_refuses_a_tokens_file_with_a_loose_mode_or_none_at_all(tmp_path: Path) -> None:
    organism = write_organism(tmp_path / "organism.yaml", pump=auth_section(require_on_socket=False))
    missing = cli("check", str(organism))
    assert (missing.returncode, "xml-pipeline token add" in missing.stderr) == (2, True)
    add_token(organism, "billing", "greeter")
    assert cli("check", str(organism)).returncode == 0
    (tmp_path / "tokens.json").chmod(0o640)
    loose = cli("check", str(organism))
    assert (loose.returncode, "chmod 600" in loose.stderr) == (2, True)


def _reload(daemon: DaemonProcess) -> None:
    daemon.signal(signal.SIGHUP)
    daemon.notify.expect("RELOADING=1")
    daemon.notify.expect("READY=1")


def test_the_door_checks_tokens_identities_grants_and_reloads_revocations() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump=auth_section(require_on_socket=True))
        alice = add_token(organism, "alice", "greeter")
        with running_daemon(organism) as daemon:
            path = daemon.socket_path
            as_alice = DaemonClient(socket_path=path, token=alice)
            as_nobody = DaemonClient(socket_path=path)
            as_liar = DaemonClient(socket_path=path, token=alice[:-2] + "xx")
            for client in (as_nobody, as_liar):
                with pytest.raises(DoorRefused) as refused:
                    client.send(envelope(GREETING, sender="alice", to="greeter"), wait="end", timeout=5)
                assert refused.value.status == 401
                with pytest.raises(DoorRefused):
                    client.status()
            assert as_nobody.request("GET", "/healthz").status == 200

            served = as_alice.send(envelope(GREETING, sender="alice", to="greeter"), wait="end", timeout=10)
            assert served.status == 200, served.body
            assert "HELLO, ADA!" in served.json()["replies"][0]
            impostor = as_alice.send(envelope(GREETING, sender="bob", to="greeter"), wait="end", timeout=5)
            assert (impostor.status, impostor.json()["error"]["code"]) == (403, "sender-forbidden")
            not_granted = as_alice.send(envelope(CRUNCH, sender="alice", to="cruncher"), wait="end", timeout=5)
            assert (not_granted.status, not_granted.json()["error"]["code"]) == (403, "target-forbidden")

            sent = cli("send", "--socket", str(path), "--sender", "alice", "greeter", GREETING, "--token", alice)
            assert sent.returncode == 0, sent.stderr
            without = cli("send", "--socket", str(path), "--sender", "alice", "greeter", GREETING)
            assert (without.returncode, "HTTP 401" in without.stderr) == (1, True)
            shown = cli("status", "--socket", str(path), "--json", "--token", alice)
            assert json.loads(shown.stdout)["organism"] == "hello"

            assert cli("token", "revoke", "alice", "-o", str(organism)).returncode == 0
            assert as_alice.status()["organism"] == "hello"  # in force until the daemon is told
            _reload(daemon)
            with pytest.raises(DoorRefused) as revoked:
                as_alice.status()
            assert revoked.value.status == 401
            assert daemon.stop() == 0
            assert "request refused (401)" in daemon.log()


def test_replies_belong_to_the_client_that_sent_the_message() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump=auth_section(require_on_socket=False))
        alice = add_token(organism, "alice", "greeter")
        bob = add_token(organism, "bob", "greeter")
        with running_daemon(organism) as daemon:
            as_alice = DaemonClient(socket_path=daemon.socket_path, token=alice)
            posted = as_alice.send(envelope(GREETING, sender="alice", to="greeter"), wait="none", timeout=5).json()
            replies = f"/threads/{posted['thread']}/replies?wait=end&timeout=10"
            for other in (
                DaemonClient(socket_path=daemon.socket_path, token=bob),
                DaemonClient(socket_path=daemon.socket_path),
            ):
                assert other.request("GET", replies).status == 404
            collected = as_alice.request("GET", replies)
            assert collected.status == 200
            assert "HELLO, ADA!" in collected.json()["replies"][0]
            assert daemon.stop() == 0


def test_a_broken_tokens_file_at_reload_keeps_the_tokens_in_force() -> None:
    with short_directory() as directory:
        organism = write_organism(directory / "organism.yaml", pump=auth_section(require_on_socket=True))
        alice = add_token(organism, "alice", "greeter")
        with running_daemon(organism) as daemon:
            (directory / "tokens.json").chmod(0o666)
            _reload(daemon)
            assert DaemonClient(socket_path=daemon.socket_path, token=alice).status()["organism"] == "hello"
            assert daemon.stop() == 0
            assert "tokens not reloaded, the previous ones stay in force" in daemon.log()
