"""TCP beyond loopback: only with TLS and tokens; served to `xml-pipeline send --tls-ca` and to curl.

127.0.0.2 stands in for an address other machines could reach: only 127.0.0.1, ::1 and
localhost are exempt from the rule, and no packet leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_support import (
    cli,
    closed_by_peer,
    free_loopback_port,
    raise_own_open_files,
    running_daemon,
    short_directory,
    wait_until,
    write_organism,
)
from tests.support import envelope
from tests.tls_support import Pki, make_pki
from xml_pipeline.daemon.client import DaemonClient

NOT_LOOPBACK = "127.0.0.2"
GREETING = '<Greeting xmlns=""><name>Ada</name></Greeting>'
AUTH = "auth:\n  tokens_file: tokens.json\n"


def tls_section(pki: Pki, *, client_certificates: bool = False) -> str:
    section = f"tls:\n  cert: {pki.server_cert}\n  key: {pki.server_key}\n"
    return section + (f"  client_ca: {pki.ca}\n" if client_certificates else "")


def organism_with(directory: Path, sections: str, tcp: str | None = None) -> Path:
    tcp_line = f"  tcp: '{tcp}'\n" if tcp else ""
    return write_organism(directory / "organism.yaml", pump=tcp_line + sections)


def add_token(organism: Path, name: str = "alice") -> str:
    added = cli("token", "add", name, "--listeners", "greeter", "-o", str(organism))
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


@pytest.mark.parametrize("address", [f"{NOT_LOOPBACK}:8470", "0.0.0.0:8470", "[::]:8470"])
def test_check_refuses_plain_tcp_beyond_loopback_and_says_why(tmp_path: Path, address: str) -> None:
    result = cli("check", str(organism_with(tmp_path, "", tcp=address)))
    assert result.returncode == 2
    assert "beyond loopback" in result.stderr
    assert "needs a tls section and an auth section" in result.stderr


def test_check_wants_both_tls_and_auth_beyond_loopback(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, NOT_LOOPBACK)
    only_tls = cli("check", str(organism_with(tmp_path, tls_section(pki), tcp=f"{NOT_LOOPBACK}:8470")))
    assert (only_tls.returncode, "needs an auth section" in only_tls.stderr) == (2, True)
    organism = organism_with(tmp_path, tls_section(pki) + AUTH, tcp=f"{NOT_LOOPBACK}:8470")
    add_token(organism)
    assert cli("check", str(organism)).returncode == 0
    assert cli("check", str(organism_with(tmp_path, "", tcp="127.0.0.1:8470"))).returncode == 0
    run = cli("run", str(organism_with(tmp_path, AUTH)), "--tcp", f"{NOT_LOOPBACK}:8470")
    assert (run.returncode, "needs a tls section" in run.stderr) == (2, True)


def test_check_refuses_a_certificate_that_does_not_load(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, NOT_LOOPBACK)
    pki.server_key.write_text("not a key")
    result = cli("check", str(organism_with(tmp_path, tls_section(pki))))
    assert (result.returncode, "cannot use tls.cert" in result.stderr) == (2, True)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@contextlib.contextmanager
def tls_daemon(
    directory: Path, *, client_certificates: bool = False, extra: str = "", **kwargs: int
) -> Iterator[tuple[str, Pki, str]]:
    pki = make_pki(directory, NOT_LOOPBACK)
    organism = organism_with(directory, tls_section(pki, client_certificates=client_certificates) + AUTH + extra)
    token = add_token(organism)
    address = f"{NOT_LOOPBACK}:{free_loopback_port()}"
    with running_daemon(organism, "--tcp", address, **kwargs) as daemon:
        yield address, pki, token
        assert daemon.stop() == 0


def test_tls_beyond_loopback_serves_send_and_curl_with_a_token() -> None:
    with short_directory() as directory, tls_daemon(directory) as (address, pki, token):
        sent = cli(
            "send", "--tcp", address, "--tls-ca", str(pki.ca), "--token", token, "--sender", "alice", "greeter",
            GREETING,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert "HELLO, ADA!" in sent.stdout

        message = directory / "message.xml"
        message.write_bytes(envelope(GREETING, sender="alice", to="greeter"))
        url = f"https://{address}/messages?wait=end&timeout=10"
        served = curl(
            "--cacert", str(pki.ca), "-H", f"Authorization: Bearer {token}", "--data-binary", f"@{message}", url
        )
        assert served.returncode == 0, served.stderr
        assert "HELLO, ADA!" in json.loads(served.stdout)["replies"][0]

        anonymous = curl("--cacert", str(pki.ca), "--write-out", "%{http_code}", "--output", "/dev/null", url)
        assert anonymous.stdout == "401"
        untrusted = curl("-H", f"Authorization: Bearer {token}", url)  # the system's CAs never signed ours
        assert untrusted.returncode != 0
        plain = curl("--write-out", "%{http_code}", f"http://{address}/healthz")
        assert plain.stdout != "200"


def test_client_certificates_when_the_daemon_asks_for_them() -> None:
    with short_directory() as directory, tls_daemon(directory, client_certificates=True) as (address, pki, token):
        url = f"https://{address}/status"
        trusted = ["--cacert", str(pki.ca), "-H", f"Authorization: Bearer {token}"]
        assert curl(*trusted, url).returncode != 0
        with_certificate = curl(*trusted, "--cert", str(pki.client_cert), "--key", str(pki.client_key), url)
        assert with_certificate.returncode == 0, with_certificate.stderr
        assert json.loads(with_certificate.stdout)["organism"] == "hello"


def test_handshakes_that_never_finish_cannot_hold_the_door() -> None:
    """1,100 connections that never say hello against 256 descriptors: a real client still gets its answer."""
    raise_own_open_files(4096)
    with short_directory() as directory:
        timeouts = "http:\n  header_timeout_seconds: 2\n"
        with tls_daemon(directory, extra=timeouts, open_files=256) as (address, pki, token):
            host, port = address.rsplit(":", 1)
            client = DaemonClient(tcp=(host, int(port)), token=token, tls_ca=pki.ca)
            silent: list[socket.socket] = []
            try:
                for _ in range(1100):
                    silent.append(socket.create_connection((host, int(port)), timeout=10))
                for _ in range(3):
                    answer = client.send(envelope(GREETING, sender="alice", to="greeter"), wait="end", timeout=10)
                    assert answer.status == 200, answer.body
                assert wait_until(lambda: all(closed_by_peer(c) for c in silent), timeout=15), (
                    "silent TLS connections outlived the header timeout"
                )
            finally:
                for connection in silent:
                    connection.close()
