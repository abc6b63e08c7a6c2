"""What operators do with dead letters: list them, put one back in its listener's stream, or purge them.

A dead letter is a hop that was delivered ``max_deliveries`` times without
being committed (each time its daemon stopped or died while handling it). Its
sender was told (``dead-letter``); the hop itself waits in ``{prefix}dlq`` for
an operator. Replaying it puts it back in its listener's stream as it was and
reopens its conversation, so its answers can be collected on the same thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from xml_pipeline.cluster.hop import Hop
from xml_pipeline.cluster.store import Keys

_REPLAY = """
-- KEYS: dlq, target stream, conversation hash. ARGV: dlq entry id, initiator, owner ('' for none), field value
-- pairs (the conversation's hash has no TTL, as every live conversation's: see store.py). A conversation that
-- ended meanwhile lives again, still its owner's: only the hash holds the owner while it lives.
local moved = redis.call('XDEL', KEYS[1], ARGV[1])
if moved == 0 then return nil end
local fields = {}
for k = 4, #ARGV do fields[k - 3] = ARGV[k] end
local entry = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('HSETNX', KEYS[3], 'initiator', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[3], 'owner', ARGV[3]) end
redis.call('HINCRBY', KEYS[3], 'pending', 1)
return entry
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    listener: str
    deliveries: int
    failed_at: float
    hop: Hop
    owner: str | None = None
    """The identity of the client that opened its conversation (None without a token), kept for a replay."""


class DeadLetters:
    def __init__(self, url: str, prefix: str) -> None:
        self.keys = Keys(prefix)
        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._replay = self._client.register_script(_REPLAY)

    def list(self, count: int = 100) -> list[DeadLetter]:
        rows: Any = self._client.xrange(self.keys.dead_letters, count=count)
        return [_letter(entry_id, fields) for entry_id, fields in rows]

    def replay(self, entry_id: str) -> str | None:
        """Put dead letter ``entry_id`` back in its listener's stream; its new entry id, or None if it is gone."""
        rows: Any = self._client.xrange(self.keys.dead_letters, min=entry_id, max=entry_id)
        if not rows:
            return None
        letter = _letter(*rows[0])
        hop = letter.hop
        keys = [self.keys.dead_letters, self.keys.stream(letter.listener), self.keys.conversation(hop.conversation)]
        new_id = self._replay(keys=keys, args=[entry_id, hop.initiator, letter.owner or "", *hop.fields()])
        return None if new_id is None else new_id.decode()

    def purge(self) -> int:
        """Delete every dead letter; how many there were."""
        count = int(self._client.xlen(self.keys.dead_letters))
        self._client.unlink(self.keys.dead_letters)
        return count

    def close(self) -> None:
        self._client.close()


def _letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        entry_id=entry_id.decode(),
        listener=fields[b"listener"].decode(),
        deliveries=int(fields[b"deliveries"]),
        failed_at=float(fields[b"failed_at"]),
        hop=Hop.from_fields(fields),
        owner=fields[b"owner"].decode() if b"owner" in fields else None,
    )
