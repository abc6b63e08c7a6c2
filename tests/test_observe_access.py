"""The observation routes stand behind the same door as the rest of HTTP, and any daemon of a Redis
organism shows any conversation's trace."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.daemon_support import cli, running_daemon, write_organism
from tests.redis_server import RedisServer
from tests.test_auth import add_token, auth_section
from tests.test_trace import GREETING_PATH, chain_of
from xml_pipeline.daemon.client import DaemonClient, DoorRefused


def test_watching_needs_the_door_and_an_operator(tmp_path: Path) -> None:
    organism = write_organism(tmp_path / "organism.yaml", pump=auth_section(require_on_socket=True))
    secret = add_token(organism, "billing", "greeter")
    with running_daemon(organism) as daemon:
        anonymous = DaemonClient(socket_path=daemon.socket_path)
        billing = DaemonClient(socket_path=daemon.socket_path, token=secret)
        for path in ("/ui", "/ui/api/graph", "/ui/api/conversations", "/threads/x/trace"):
            with pytest.raises(DoorRefused) as unauthorized:
                anonymous.request("GET", path)
            assert unauthorized.value.status == 401, path
        for path in ("/ui", "/ui/app.js", "/ui/api/graph", "/ui/api/conversations", "/ui/api/dead-letters"):
            assert billing.request("GET", path).status == 403, path
        with pytest.raises(DoorRefused) as forbidden:
            next(billing.stream("/events", timeout=10))
        assert forbidden.value.status == 403
        sent = cli("send", "greeter", "<Greeting><name>Ada</name></Greeting>", "--sender", "billing",
                   "--socket", str(daemon.socket_path), "--token", secret)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        thread = sent.stderr.split()[1].rstrip(":")
        own = billing.trace(thread, with_xml=False)
        assert own.status == 200
        assert chain_of(own.json())[0] == ("billing", "greeter")


def test_any_daemon_of_a_durable_organism_shows_the_trace(tmp_path: Path, redis_server: RedisServer) -> None:
    backend = (
        f"backend:\n  type: redis\n  redis_url: {redis_server.url}\n  redis_prefix: 'o{uuid.uuid4().hex[:6]}:'\n"
        "  delivery: at-least-once\n"
    )
    organism = write_organism(tmp_path / "organism.yaml", pump=backend)
    with running_daemon(organism) as first, running_daemon(organism) as second:
        sent = cli("send", "greeter", "<Greeting><name>Ada</name></Greeting>", "--socket", str(first.socket_path))
        assert sent.returncode == 0, sent.stderr
        thread = sent.stderr.split()[1].rstrip(":")
        shown = cli("trace", thread, "--json", "--socket", str(second.socket_path))
    assert shown.returncode == 0, shown.stderr
    trace = json.loads(shown.stdout)
    assert chain_of(trace) == GREETING_PATH
    assert trace["ended"] is not None
