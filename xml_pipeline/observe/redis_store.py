"""Traces kept in Redis (backend ``redis``, either delivery mode), so that any daemon can show any trace.

Keys, under the organism's prefix::

    {prefix}trace:{conversation}       STRING  the trace: newline-delimited JSON records, appended
    {prefix}trace-info:{conversation}  HASH    started, from, to, hops, errors, dropped, ended
    {prefix}traces                     ZSET    conversation -> start time: the recent ones, and the count bound

The bounds are the in-memory store's: at most ``trace_max_conversations``
traces (a new one evicts the oldest), at most ``trace_max_bytes`` in one
trace (later records are counted in ``dropped``), and a finished trace
expires ``trace_retention_seconds`` after its end. A running one carries the
backend's ``redis_ttl``, like the conversation's own state.

Writing never holds up the engine: events are encoded into a bounded buffer,
and a writer task sends everything buffered, one script call per conversation,
in one pipeline per turn of the event loop. If Redis is slow or away, the
buffer fills and further records are dropped and counted (``trace_dropped`` in
``status``), never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from xml_pipeline.cancelling import raise_if_cancelling
from xml_pipeline.observe.events import ErrorEvent, HandledEvent, HopEvent, Sink
from xml_pipeline.observe.memory_store import StoredTrace
from xml_pipeline.observe.records import (
    decode_lines,
    encode,
    end_record,
    error_record,
    handled_record,
    hop_record,
)
from xml_pipeline.observe.settings import ObserveSettings

log = logging.getLogger("xml_pipeline.observe")

MAX_BUFFERED = 100_000
"""Records waiting for the writer at most; more are dropped and counted."""
WARN_EVERY_SECONDS = 10.0

_APPEND = """
-- KEYS: trace, info, index. ARGV: conversation, budget, live ttl (0: none), retention, max conversations,
--   now, prefix, hops, errors, ended (0/1), from, to, then the records
local trace, info, index = KEYS[1], KEYS[2], KEYS[3]
local conv, budget, live, retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max, now, prefix = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
if redis.call('EXISTS', info) == 0 then
  redis.call('HSET', info, 'started', now)
  redis.call('ZADD', index, now, conv)
  local over = redis.call('ZCARD', index) - max
  if over > 0 then
    local oldest = redis.call('ZPOPMIN', index, over)
    for k = 1, #oldest, 2 do
      redis.call('UNLINK', prefix .. 'trace:' .. oldest[k], prefix .. 'trace-info:' .. oldest[k])
    end
  end
end
if ARGV[11] ~= '' then
  redis.call('HSETNX', info, 'from', ARGV[11])
  redis.call('HSETNX', info, 'to', ARGV[12])
end
local size, dropped = redis.call('STRLEN', trace), 0
for k = 13, #ARGV do
  local record = ARGV[k]
  if size + #record <= budget then
    redis.call('APPEND', trace, record)
    size = size + #record
  else
    dropped = dropped + 1
  end
end
redis.call('HINCRBY', info, 'hops', tonumber(ARGV[8]))
redis.call('HINCRBY', info, 'errors', tonumber(ARGV[9]))
if dropped > 0 then redis.call('HINCRBY', info, 'dropped', dropped) end
local ttl = live
if ARGV[10] == '1' then
  redis.call('HSET', info, 'ended', now)
  ttl = retention
end
if ttl > 0 then
  redis.call('EXPIRE', trace, ttl)
  redis.call('EXPIRE', info, ttl)
else
  redis.call('PERSIST', trace)
  redis.call('PERSIST', info)
end
if live > 0 then redis.call('EXPIRE', index, math.max(live, retention)) end
return dropped
"""


class _Pending:
    """One conversation's records waiting for the writer."""

    __slots__ = ("ended", "errors", "first", "hops", "records")

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.hops = 0
        self.errors = 0
        self.first = ("", "")
        self.ended = False


class RedisTraceStore(Sink):
    def __init__(
        self, url: str, prefix: str, live_ttl: int, settings: ObserveSettings, *, socket_timeout: float = 2.0
    ) -> None:
        self.prefix = prefix
        self.live_ttl = live_ttl
        self.retention = max(1, round(settings.trace_retention_seconds))
        self.max_conversations = settings.trace_max_conversations
        self.max_bytes = settings.trace_max_bytes
        self.timeout = socket_timeout
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._append = self.client.register_script(_APPEND)
        self._pending: dict[str, _Pending] = {}
        self._buffered = 0
        self._wake = asyncio.Event()
        self.dropped = 0
        """Records lost before reaching Redis (buffer full, or Redis failing)."""
        self._last_warning = float("-inf")

    # ------------------------------------------------------------------ the sink: encode and buffer, never wait
    def hop(self, event: HopEvent) -> None:
        _, _, parent, conversation, sender, to, _, _, _, _ = event
        pending = self._buffer(conversation, encode(hop_record(event)))
        if pending is not None:
            pending.hops += 1
            if not parent and not pending.first[0]:
                pending.first = (sender, to)

    def handled(self, event: HandledEvent) -> None:
        self._buffer(event[2], encode(handled_record(event)))  # by conversation

    def error(self, event: ErrorEvent) -> None:
        pending = self._buffer(event[2], encode(error_record(event)))  # by conversation
        if pending is not None:
            pending.errors += 1

    def ended(self, conversation: str, at: float) -> None:
        pending = self._buffer(conversation, encode(end_record(at)))
        if pending is not None:
            pending.ended = True

    def _buffer(self, conversation: str, record: bytes) -> _Pending | None:
        if self._buffered >= MAX_BUFFERED:
            self._lost(1, "the trace writer is behind")
            return None
        pending = self._pending.get(conversation)
        if pending is None:
            pending = self._pending[conversation] = _Pending()
        pending.records.append(record)
        self._buffered += 1
        self._wake.set()
        return pending

    def _lost(self, count: int, why: str) -> None:
        self.dropped += count
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning("trace records dropped (%d so far): %s", self.dropped, why)

    # ------------------------------------------------------------------ the writer
    async def run(self) -> None:
        """Send what is buffered, a batch per turn, until cancelled."""
        while True:
            raise_if_cancelling()
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything buffered now, in one pipeline (bounded by the socket timeout)."""
        if not self._pending:
            return
        batch, self._pending, self._buffered = self._pending, {}, 0
        now = time.time()
        pipeline = self.client.pipeline(transaction=False)
        for conversation, pending in batch.items():
            keys = [self._key("trace:", conversation), self._key("trace-info:", conversation), self._index]
            args: list[Any] = [
                conversation,
                self.max_bytes,
                self.live_ttl,
                self.retention,
                self.max_conversations,
                now,
                self.prefix,
                pending.hops,
                pending.errors,
                1 if pending.ended else 0,
                *pending.first,
                *pending.records,
            ]
            await self._append(keys=keys, args=args, client=pipeline)
        try:
            async with asyncio.timeout(self.timeout * 2):
                await pipeline.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise_if_cancelling()
            self._lost(sum(len(pending.records) for pending in batch.values()), f"redis: {exc}")

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.flush()
        await self.client.aclose()

    # ------------------------------------------------------------------ reading, from any daemon
    @property
    def _index(self) -> str:
        return f"{self.prefix}traces"

    def _key(self, kind: str, conversation: str) -> str:
        return f"{self.prefix}{kind}{conversation}"

    async def trace(self, conversation: str) -> StoredTrace | None:
        async with asyncio.timeout(self.timeout):
            pipeline = self.client.pipeline(transaction=False)
            pipeline.get(self._key("trace:", conversation))
            pipeline.hgetall(self._key("trace-info:", conversation))
            data, info = await pipeline.execute()
        if not info:
            return None
        return StoredTrace(decode_lines(data or b""), int(info.get(b"dropped", 0)))

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(self.timeout):
            conversations: list[bytes] = await self.client.zrevrange(self._index, 0, limit - 1)  # type: ignore[assignment]
            pipeline = self.client.pipeline(transaction=False)
            for conversation in conversations:
                pipeline.hgetall(self._key("trace-info:", conversation.decode()))
            infos = await pipeline.execute()
        found = []
        for conversation, info in zip(conversations, infos, strict=True):
            if not info:
                continue
            ended = info.get(b"ended")
            found.append(
                {
                    "conversation": conversation.decode(),
                    "started": float(info[b"started"]),
                    "ended": float(ended) if ended is not None else None,
                    "from": info.get(b"from", b"").decode(),
                    "to": info.get(b"to", b"").decode(),
                    "hops": int(info.get(b"hops", 0)),
                    "errors": int(info.get(b"errors", 0)),
                }
            )
        return found

    def stats(self) -> dict[str, Any]:
        return {"store": "redis", "trace_buffered": self._buffered, "trace_dropped": self.dropped}
