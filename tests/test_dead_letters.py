"""The dead-letter stream as operators handle it: list, replay, purge (real redis-server)."""

from __future__ import annotations

import redis

from tests.redis_server import RedisServer
from xml_pipeline.cluster.dead_letters import DeadLetters
from xml_pipeline.cluster.hop import Hop
from xml_pipeline.cluster.store import Keys

HOP = Hop(
    "conv-1", ("console", "worker"), ("conv-1", "t-1"), "console", "tests.support:Ping", b"<Ping><text>x</text></Ping>"
)


def _letter(server: RedisServer, prefix: str) -> str:
    client = redis.Redis.from_url(server.url)
    try:
        fields = [*HOP.fields(), "listener", "worker", "deliveries", "3", "failed_at", "1733011200.5"]
        entry = client.xadd(Keys(prefix).dead_letters, dict(zip(fields[::2], fields[1::2], strict=True)))
        return entry.decode()
    finally:
        client.close()


def test_list_replay_and_purge(redis_server: RedisServer) -> None:
    prefix = "dl-ops:"
    letters = DeadLetters(redis_server.url, prefix)
    client = redis.Redis.from_url(redis_server.url)
    try:
        first = _letter(redis_server, prefix)
        [listed] = letters.list()
        assert (listed.entry_id, listed.listener, listed.deliveries, listed.hop) == (first, "worker", 3, HOP)

        replayed = letters.replay(first)
        assert replayed is not None
        [(_, fields)] = client.xrange(Keys(prefix).stream("worker"))
        assert Hop.from_fields(fields) == HOP  # back in its listener's stream as it was
        assert client.hget(Keys(prefix).conversation("conv-1"), "pending") == b"1"
        assert client.ttl(Keys(prefix).conversation("conv-1")) == -1  # live again: it lasts until its end
        assert letters.list() == []
        assert letters.replay(first) is None  # gone: nothing replays twice

        _letter(redis_server, prefix)
        _letter(redis_server, prefix)
        assert letters.purge() == 2
        assert letters.list() == []
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.unlink(key)
        client.close()
        letters.close()
