"""Shared state in Redis: many processes, many machines, expiry built in.

Key layout, all under one prefix (``xp:`` by default) so that organisms can
share a server and a prefix can be wiped with ``SCAN`` + ``UNLINK``:

    {prefix}buf:{thread}        LIST of encoded slots, one per hop
    {prefix}buf-index           ZSET thread -> expiry time (unix seconds)
    {prefix}reg:c:{chain key}   STRING thread UUID of a chain
    {prefix}reg:u:{uuid}        STRING chain key of a UUID
    {prefix}rec:{kind}:{id}     HASH orchestration state (buffers, sequences)

Every multi-key update is one Lua script, so it is atomic however many
processes race. Every key carries the TTL, refreshed whenever it is used, so
state left behind by a crashed daemon disappears on its own. The thread index is
a sorted set scored by expiry rather than a plain set, so the thread count used
for the ``max_threads`` cap cannot drift when lists expire: expired members are
pruned before counting.

Connection problems are retried with exponential backoff by redis-py; if the
server stays away, methods raise :class:`BackendUnavailable`, which the pump
turns into a ``backend-unavailable`` SystemError for the caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from xml_pipeline.memory.shared_backend import BackendUnavailable, BufferFull, TooManyThreads
from xml_pipeline.memory.state_ops import AppendSlot, ForgetThread, RegisterThread, StateOp

DEFAULT_PREFIX = "xp:"
DEFAULT_TTL = 86_400
SCAN_BATCH = 500

_APPEND = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local length = redis.call('LLEN', KEYS[1])
if length == 0 then
  if redis.call('ZSCORE', KEYS[2], ARGV[5]) == false and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
    return -2
  end
elseif length >= tonumber(ARGV[2]) then
  return -1
end
local count = redis.call('RPUSH', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[4])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[5])
redis.call('EXPIRE', KEYS[2], ttl)
return count - 1
"""

_DELETE_THREAD = """
local removed = redis.call('UNLINK', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return removed
"""

_GET_OR_SET = """
local existing = redis.call('GET', KEYS[1])
if existing then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', ARGV[4] .. existing, ARGV[3])
  return existing
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return ARGV[1]
"""

_SET = """
local previous = redis.call('GET', KEYS[1])
if previous and previous ~= ARGV[1] then
  redis.call('UNLINK', ARGV[4] .. previous)
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""

_DELETE_UUID = """
local chain = redis.call('GET', KEYS[1])
if not chain then
  return 0
end
redis.call('UNLINK', KEYS[1])
local chain_key = ARGV[1] .. chain
if redis.call('GET', chain_key) == ARGV[2] then
  redis.call('UNLINK', chain_key)
end
return 1
"""


@dataclass(frozen=True, slots=True)
class RedisSpec:
    """How a worker process reaches the same Redis state."""

    url: str
    prefix: str = DEFAULT_PREFIX
    ttl: int = DEFAULT_TTL


class RedisBackend:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: int = DEFAULT_TTL,
        retries: int = 3,
        socket_timeout: float = 2.0,
    ) -> None:
        if ttl < 1:
            raise ValueError("ttl must be at least one second")
        self.spec = RedisSpec(url, prefix, ttl)
        self.prefix = prefix
        self.ttl = ttl
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
        )
        self._append = self._client.register_script(_APPEND)
        self._delete_thread = self._client.register_script(_DELETE_THREAD)
        self._get_or_set = self._client.register_script(_GET_OR_SET)
        self._set = self._client.register_script(_SET)
        self._delete_uuid = self._client.register_script(_DELETE_UUID)

    @classmethod
    def from_spec(cls, spec: RedisSpec) -> RedisBackend:
        return cls(spec.url, prefix=spec.prefix, ttl=spec.ttl)

    # --- keys ---
    def _buffer_key(self, thread_id: str) -> str:
        return f"{self.prefix}buf:{thread_id}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}buf-index"

    def _chain_key(self, chain: str) -> str:
        return f"{self.prefix}reg:c:{chain}"

    def _uuid_key(self, uuid: str) -> str:
        return f"{self.prefix}reg:u:{uuid}"

    def _run(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"redis is unreachable: {exc}") from None
        except RedisError as exc:
            raise BackendUnavailable(f"redis refused the operation: {exc}") from None

    def _scan(self, pattern: str) -> Iterator[bytes]:
        try:
            yield from self._client.scan_iter(match=pattern, count=SCAN_BATCH)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"redis is unreachable: {exc}") from None

    def _unlink_matching(self, pattern: str) -> None:
        batch: list[bytes] = []
        for key in self._scan(pattern):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                self._run(self._client.unlink, *batch)
                batch.clear()
        if batch:
            self._run(self._client.unlink, *batch)

    @property
    def is_shared(self) -> bool:
        return True

    # --- each write as (script, keys, args), for single calls and batches alike ---
    def _append_call(self, op: AppendSlot) -> tuple[Script, list[Any], list[Any]]:
        keys = [self._buffer_key(op.thread_id), self._index_key]
        return self._append, keys, [op.slot, op.max_slots, op.max_threads, self.ttl, op.thread_id]

    def _set_call(self, op: RegisterThread) -> tuple[Script, list[Any], list[Any]]:
        keys = [self._chain_key(op.chain), self._uuid_key(op.uuid)]
        return self._set, keys, [op.uuid, op.chain, self.ttl, self._uuid_key("")]

    def _forget_call(self, op: ForgetThread) -> tuple[Script, list[Any], list[Any]]:
        return self._delete_uuid, [self._uuid_key(op.uuid)], [self._chain_key(""), op.uuid]

    def _delete_history_call(self, thread_id: str) -> tuple[Script, list[Any], list[Any]]:
        return self._delete_thread, [self._buffer_key(thread_id), self._index_key], [thread_id]

    def _call_for(self, op: StateOp) -> tuple[Script, list[Any], list[Any]]:
        if isinstance(op, AppendSlot):
            return self._append_call(op)
        if isinstance(op, RegisterThread):
            return self._set_call(op)
        if isinstance(op, ForgetThread):
            return self._forget_call(op)
        return self._delete_history_call(op.thread_id)

    @staticmethod
    def _append_outcome(op: AppendSlot, index: int) -> int:
        if index == -1:
            raise BufferFull(f"thread {op.thread_id} holds {op.max_slots} slots already")
        if index == -2:
            raise TooManyThreads(f"the buffer holds {op.max_threads} threads already")
        return index

    def _outcome(self, op: StateOp, raw: object) -> object:
        if isinstance(raw, Exception):
            return BackendUnavailable(f"redis refused the operation: {raw}")
        if isinstance(op, AppendSlot):
            try:
                return self._append_outcome(op, int(raw))  # type: ignore[call-overload]
            except (BufferFull, TooManyThreads) as refused:
                return refused
        if isinstance(op, RegisterThread):
            return None
        return bool(raw)

    def apply(self, ops: Sequence[StateOp]) -> list[object]:
        """One pipeline (no transaction) for all of ``ops``: one round trip.

        Scripts are called by SHA. A server that lost them (restarted, SCRIPT
        FLUSH) refuses those calls without running them, so they are loaded
        and just those ops are sent again, still in order.
        """
        calls = [self._call_for(op) for op in ops]
        raw = self._pipeline(calls)
        missing = [index for index, result in enumerate(raw) if isinstance(result, NoScriptError)]
        if missing:
            for script in {call[0] for call in calls}:
                self._run(self._client.script_load, script.script)
            for index, result in zip(missing, self._pipeline([calls[index] for index in missing]), strict=True):
                raw[index] = result
        return [self._outcome(op, result) for op, result in zip(ops, raw, strict=True)]

    def _pipeline(self, calls: Sequence[tuple[Script, list[Any], list[Any]]]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(self._run(pipe.execute, raise_on_error=False))

    # --- context buffer ---
    def buffer_append(self, thread_id: str, slot: bytes, *, max_slots: int, max_threads: int) -> int:
        op = AppendSlot(thread_id, slot, max_slots, max_threads)
        script, keys, args = self._append_call(op)
        return self._append_outcome(op, int(self._run(script, keys=keys, args=args)))

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        key = self._buffer_key(thread_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.lrange(key, 0, -1)
        pipe.expire(key, self.ttl)
        slots, _ = self._run(pipe.execute)
        return list(slots)

    def buffer_get_slot(self, thread_id: str, index: int) -> bytes | None:
        if index < 0:
            return None
        result: bytes | None = self._run(self._client.lindex, self._buffer_key(thread_id), index)
        return result

    def buffer_thread_len(self, thread_id: str) -> int:
        return int(self._run(self._client.llen, self._buffer_key(thread_id)))

    def buffer_thread_exists(self, thread_id: str) -> bool:
        return bool(self._run(self._client.exists, self._buffer_key(thread_id)))

    def buffer_delete_thread(self, thread_id: str) -> bool:
        script, keys, args = self._delete_history_call(thread_id)
        return bool(self._run(script, keys=keys, args=args))

    def buffer_list_threads(self) -> list[str]:
        start = len(self._buffer_key(""))
        return [key.decode()[start:] for key in self._scan(self._buffer_key("*"))]

    def buffer_clear(self) -> None:
        self._unlink_matching(self._buffer_key("*"))
        self._run(self._client.unlink, self._index_key)

    # --- thread registry ---
    def registry_set(self, chain: str, uuid: str) -> None:
        script, keys, args = self._set_call(RegisterThread(chain, uuid))
        self._run(script, keys=keys, args=args)

    def registry_get_or_set(self, chain: str, uuid: str) -> str:
        keys = [self._chain_key(chain), self._uuid_key(uuid)]
        result = self._run(self._get_or_set, keys=keys, args=[uuid, chain, self.ttl, self._uuid_key("")])
        return result.decode() if isinstance(result, bytes) else str(result)

    def registry_get_uuid(self, chain: str) -> str | None:
        result = self._run(self._client.getex, self._chain_key(chain), ex=self.ttl)
        return result.decode() if result is not None else None

    def registry_get_chain(self, uuid: str) -> str | None:
        result = self._run(self._client.getex, self._uuid_key(uuid), ex=self.ttl)
        return result.decode() if result is not None else None

    def registry_delete(self, uuid: str) -> bool:
        script, keys, args = self._forget_call(ForgetThread(uuid))
        return bool(self._run(script, keys=keys, args=args))

    def registry_list_all(self) -> dict[str, str]:
        keys = list(self._scan(self._uuid_key("*")))
        start = len(self._uuid_key(""))
        found: dict[str, str] = {}
        for offset in range(0, len(keys), SCAN_BATCH):
            batch = keys[offset : offset + SCAN_BATCH]
            for key, chain in zip(batch, self._run(self._client.mget, batch), strict=True):
                if chain is not None:  # expired between SCAN and MGET
                    found[key.decode()[start:]] = chain.decode()
        return found

    def registry_clear(self) -> None:
        self._unlink_matching(f"{self.prefix}reg:*")

    # --- records ---
    def _record_key(self, kind: str, record_id: str) -> str:
        return f"{self.prefix}rec:{kind}:{record_id}"

    def record_put(self, kind: str, record_id: str, field: str, value: bytes, *, only_if_absent: bool = False) -> bool:
        key = self._record_key(kind, record_id)
        pipe = self._client.pipeline(transaction=True)
        if only_if_absent:
            pipe.hsetnx(key, field, value)
        else:
            pipe.hset(key, field, value)
        pipe.expire(key, self.ttl)
        written, _ = self._run(pipe.execute)
        return bool(written) or not only_if_absent

    def record_get(self, kind: str, record_id: str) -> dict[str, bytes]:
        key = self._record_key(kind, record_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.expire(key, self.ttl)
        fields, _ = self._run(pipe.execute)
        return {name.decode(): value for name, value in fields.items()}

    def record_delete(self, kind: str, record_id: str) -> bool:
        return bool(self._run(self._client.unlink, self._record_key(kind, record_id)))

    def record_list(self, kind: str) -> list[str]:
        start = len(self._record_key(kind, ""))
        return [key.decode()[start:] for key in self._scan(self._record_key(kind, "*"))]

    def record_clear(self, kind: str) -> None:
        self._unlink_matching(self._record_key(kind, "*"))

    # --- housekeeping ---
    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except RedisError:
            return False

    def info(self) -> dict[str, Any]:
        server = self._run(self._client.info, "server")
        return {"type": "redis", "prefix": self.prefix, "ttl": self.ttl, "redis_version": server.get("redis_version")}

    def keys(self) -> list[str]:
        """Every key under this backend's prefix (SCAN), for tests and operators."""
        return sorted(key.decode() for key in self._scan(f"{self.prefix}*"))

    def close(self) -> None:
        self._client.close()
