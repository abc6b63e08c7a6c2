"""Shared state in Redis: many processes, many machines, expiry built in.

Key layout, all under one prefix (``xp:`` by default) so that organisms can
share a server and a prefix can be wiped with ``SCAN`` + ``UNLINK``:

    {prefix}buf:{thread}        LIST of encoded slots, one per hop
    {prefix}buf-index           ZSET thread -> expiry time (unix seconds)
    {prefix}reg:c:{chain key}   STRING thread UUID of a chain
    {prefix}reg:u:{uuid}        STRING chain key of a UUID
    {prefix}rec:{kind}:{id}     HASH orchestration state (buffers, sequences)
    {prefix}durable             STRING set by the durable engine: this prefix holds durable
                                conversations (so the batch script looks for them)
    {prefix}conv:{conversation} HASH a live conversation of the durable engine (see
                                :mod:`xml_pipeline.cluster.store`), which holds its threads'
                                registrations itself: ``/{chain}`` -> UUID (the chain key
                                after the conversation's id), and its own thread (the
                                conversation's id) stands for the chain of its ``initiator``
                                unless that chain has a field (``''``: forgotten)

A durable conversation's other threads still have their ``reg:u`` keys (a
lookup by UUID has nothing else to go by), but no ``reg:c`` keys, and its own
thread has neither: two keys fewer to write and delete for every thread, and
four for a conversation of one hop. Reads by chain look in the live
conversation's hash first (a ``reg:c`` key an earlier daemon wrote may have
been registered again there since), reads by UUID when the key is not there.
Threads registered through the registry while the conversation lives go to
its hash as well (with ``reg:u`` keys without a TTL, named ``#{uuid}`` in
the hash), so that its end deletes them with the others.

Every write (thread registered or forgotten, slot appended, history deleted)
runs inside one Lua script that takes a whole batch of them (see
:meth:`RedisBackend.apply`), so a batch is one round trip and atomic however
many processes race. The script builds key names from the prefix it is given,
so it suits a single Redis server (or a replicated one), not Redis Cluster.
Every key carries the TTL, refreshed whenever it is used, so state left
behind by a crashed daemon disappears on its own (a read refreshes only a key
that has one: the durable engine keeps a live conversation's history and
threads without a TTL, and reading them keeps it so). A TTL of 0 means no key
expires (as in the reference design): finished conversations are still
deleted, but what a crashed daemon leaves behind stays until someone deletes
the prefix. The thread index is a sorted
set scored by expiry rather than a plain set, so the thread count used for the
``max_threads`` cap cannot drift when lists expire: expired members are pruned
before counting.

Refused connections are retried with exponential backoff by redis-py; a call
that times out is not retried (it may have run). If the server stays away,
methods raise :class:`BackendUnavailable`, which the pump turns into a
``backend-unavailable`` SystemError for the caller, and the circuit
(:mod:`xml_pipeline.memory.circuit`) makes the next calls fail at once rather
than each wait out the socket timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from xml_pipeline.memory.circuit import Circuit
from xml_pipeline.memory.shared_backend import (
    DEFAULT_REDIS_PREFIX,
    DEFAULT_REDIS_TTL,
    DEFAULT_REDIS_URL,
    BackendUnavailable,
    BufferFull,
    TooManyThreads,
)
from xml_pipeline.memory.state_ops import AppendSlot, DeleteHistory, ForgetThread, RegisterThread, StateOp

DEFAULT_URL = DEFAULT_REDIS_URL
DEFAULT_PREFIX = DEFAULT_REDIS_PREFIX
DEFAULT_TTL = DEFAULT_REDIS_TTL
SCAN_BATCH = 500

_LIVE_REGISTRATIONS = """
-- A live durable conversation registers its threads in its hash (see the layout): '/{chain}' -> UUID ('' for
-- its own chain once its own thread is forgotten or another took the chain: the hash then no longer stands
-- for its own thread), and '#{uuid}' for each thread whose key (without a TTL) its end deletes. Registrations
-- made through the registry while it lives go there too, so that they end with it. Needs uuid_prefix (and
-- prefix, for conversation_of), and
-- durable: whether the prefix holds durable conversations at all (the at-most-once pump's batches, which
-- never meet one, then pay no look per registration).
local function conversation_of(chain)
  -- The hash of the durable conversation a chain key names, the rest of the key (from its '/'), and the
  -- conversation's id; nil when it names none, or when the prefix holds no durable conversation (then the
  -- at-most-once pump's every registration and forgetting costs no string work for them either).
  if not durable then return nil end
  local conv, rest = string.match(chain, '^([^/]+)(/.*)$')
  if not conv then return nil end
  return prefix .. 'conv:' .. conv, rest, conv
end
local function registration(hash, rest)
  -- For the hash of the conversation a chain key names (nil: it names none) and the rest of the key: whether
  -- the conversation lives, the chain's field (false: none), and whether the chain is its own.
  if not hash or not durable then return false, false, false end
  local found = redis.call('HMGET', hash, 'initiator', rest)
  if not found[1] then return false, false, false end
  return true, found[2], '/' .. found[1] == rest
end
local function register_in(hash, rest, uuid, chain)
  redis.call('HSET', hash, rest, uuid, '#' .. uuid, '')
  redis.call('SET', uuid_prefix .. uuid, chain)
end
local function forget_in(hash, rest, own)
  if own then redis.call('HSET', hash, rest, '') else redis.call('HDEL', hash, rest) end
end
local function chain_thread(chain_key, hash, rest, conv, ttl, refresh_uuid)
  -- The thread of a chain, and whether its conversation lives: the hash first (a key an earlier daemon wrote
  -- for the chain may have been registered again there since), then the chain's key, which a read refreshes
  -- only if it has a TTL (see _REFRESH).
  local live, field, own = registration(hash, rest)
  if field then return field ~= '' and field, live end
  local uuid = redis.call('GET', chain_key)
  if uuid then
    if ttl > 0 and redis.call('TTL', chain_key) > 0 then
      redis.call('EXPIRE', chain_key, ttl)
      if refresh_uuid then redis.call('EXPIRE', uuid_prefix .. uuid, ttl) end
    end
    return uuid, live
  end
  return own and conv, live
end
"""

_LIVE_REGISTRATIONS_MARK = "-- (the functions of _LIVE_REGISTRATIONS)\n"


def _with_live_registrations(script: str) -> str:
    """``script`` with _LIVE_REGISTRATIONS' functions where it marks them (its own locals declared above)."""
    if script.count(_LIVE_REGISTRATIONS_MARK) != 1:
        raise ValueError("a script using _LIVE_REGISTRATIONS marks where its functions go, once")
    return script.replace(_LIVE_REGISTRATIONS_MARK, _LIVE_REGISTRATIONS)


_APPLY = _with_live_registrations("""
-- ARGV: prefix, ttl (0: never expire), then the ops as one MessagePack array (one argument instead of
-- hundreds: each argument costs the client and Redis alike, whatever its size), then the slots, an argument
-- each (a slot inside the array would have its every byte hashed twice by Redis's Lua: as the array's
-- argument and as the string unpacked from it):
--   a thread slot-number max_slots max_threads (a cap below 0: none; the slot is ARGV[3 + slot-number]) |
--   r chain uuid | f uuid | d thread
-- Numbers go to redis.call as the strings they are made from once: Lua formats a number argument with
-- sprintf at every call (about 2,000 instructions each, 5% of a round trip's Redis work).
local prefix, ttl_text = ARGV[1], ARGV[2]
local ttl = tonumber(ttl_text)
local ops = cmsgpack.unpack(ARGV[3])
local now_text = redis.call('TIME')[1]
local expires_at = '+inf'
if ttl > 0 then expires_at = tostring(tonumber(now_text) + ttl) end
local function touch(key)
  if ttl > 0 then redis.call('EXPIRE', key, ttl_text) end
end
local function set(key, value)
  if ttl > 0 then redis.call('SET', key, value, 'EX', ttl_text) else redis.call('SET', key, value) end
end
local index_key = prefix .. 'buf-index'
local uuid_prefix, chain_prefix, buffer_prefix = prefix .. 'reg:u:', prefix .. 'reg:c:', prefix .. 'buf:'
local durable = redis.call('EXISTS', prefix .. 'durable') == 1  -- once per batch (see the layout)
-- (the functions of _LIVE_REGISTRATIONS)
local results, appended = {}, false
local i, n = 1, #ops
while i <= n do
  local code = ops[i]
  if code == 'a' then
    local thread = ops[i + 1]
    local key = buffer_prefix .. thread
    if not appended then
      redis.call('ZREMRANGEBYSCORE', index_key, '-inf', now_text)
      appended = true
    end
    local max_slots, max_threads = tonumber(ops[i + 3]), tonumber(ops[i + 4])
    -- Pushed first and taken back if over a cap (the script runs alone: nobody sees it), so that the
    -- common case is one call instead of a length check and the push.
    local length = redis.call('RPUSH', key, ARGV[3 + ops[i + 2]])
    local result = length - 1
    if length == 1 then
      if max_threads >= 0 and redis.call('ZSCORE', index_key, thread) == false
          and redis.call('ZCARD', index_key) >= max_threads then
        redis.call('UNLINK', key)  -- a new thread, one too many: it held only this slot
        result = -2
      end
    elseif max_slots >= 0 and length > max_slots then
      redis.call('RPOP', key)
      result = -1
    end
    if result >= 0 then
      touch(key)
      redis.call('ZADD', index_key, expires_at, thread)
    end
    results[#results + 1] = result
    i = i + 5
  elseif code == 'r' then
    local chain, uuid = ops[i + 1], ops[i + 2]
    local chain_key = chain_prefix .. chain
    local hash, rest, conv = conversation_of(chain)
    local live, field, own = registration(hash, rest)
    if live then
      -- A chain of a live durable conversation: registered in its hash, as its hops' are (see the layout).
      local previous = field
      if not previous then
        previous = redis.call('GET', chain_key)  -- registered by a daemon before the hash held chains
        if previous then redis.call('UNLINK', chain_key) elseif own then previous = conv end
      end
      register_in(hash, rest, uuid, chain)
      if previous and previous ~= '' and previous ~= uuid then
        redis.call('UNLINK', uuid_prefix .. previous)
      end
    else
      local previous  -- SET ... GET: the write and the look at what it replaces, one call
      if ttl > 0 then
        previous = redis.call('SET', chain_key, uuid, 'EX', ttl_text, 'GET')
      else
        previous = redis.call('SET', chain_key, uuid, 'GET')
      end
      if previous and previous ~= uuid then
        redis.call('UNLINK', uuid_prefix .. previous)
      end
      set(uuid_prefix .. uuid, chain)
    end
    results[#results + 1] = 1
    i = i + 3
  elseif code == 'f' then
    local uuid = ops[i + 1]
    local chain = redis.call('GETDEL', uuid_prefix .. uuid)
    local result = 0
    if chain then
      local chain_key = chain_prefix .. chain
      local hash, rest, conv = conversation_of(chain)
      local live, field, own = registration(hash, rest)
      if live and (field == uuid or (not field and own and uuid == conv)) then
        -- The chain's thread in its live conversation's hash: the chain goes with it, and so does a key an
        -- earlier daemon wrote for the chain (the hash's registration came after it).
        forget_in(hash, rest, own)
        redis.call('UNLINK', chain_key)
      elseif redis.call('GET', chain_key) == uuid then
        redis.call('UNLINK', chain_key)
      end
      result = 1
    else
      -- No key: a live durable conversation's own thread, which its hash stands for, if it still does.
      local hash = prefix .. 'conv:' .. uuid
      local initiator = durable and redis.call('HGET', hash, 'initiator')
      if initiator then
        result = redis.call('HSETNX', hash, '/' .. initiator, '')
      end
    end
    results[#results + 1] = result
    i = i + 2
  elseif code == 'd' then
    local thread = ops[i + 1]
    results[#results + 1] = redis.call('UNLINK', buffer_prefix .. thread)
    redis.call('ZREM', index_key, thread)
    i = i + 2
  else
    return redis.error_reply('unknown state op ' .. tostring(code))
  end
end
if appended then
  touch(index_key)
end
return results
""")

_GET_OR_SET = _with_live_registrations("""
-- KEYS: the chain's key, the UUID's key, the hash of the conversation the chain key names (see _CHAIN_THREAD);
-- ARGV: uuid, chain, ttl, the registry's UUID key prefix, the chain after the conversation's id ('' if none),
-- the conversation's id.
local ttl, uuid_prefix, durable = tonumber(ARGV[3]), ARGV[4], true
local hash = ARGV[5] ~= '' and KEYS[3] or nil
-- (the functions of _LIVE_REGISTRATIONS)
local existing, live = chain_thread(KEYS[1], hash, ARGV[5], ARGV[6], ttl, true)
if existing then return existing end
if live then  -- the conversation's, ended with it
  register_in(hash, ARGV[5], ARGV[1], ARGV[2])
elseif ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[2])
end
return ARGV[1]
""")


_CHAIN_THREAD = _with_live_registrations("""
-- The UUID of a chain. KEYS: the chain's registry key, and the hash of the durable conversation its key names
-- (the part before the first '/'; a key of the reference's dotted API names none, and the hash is not there).
-- ARGV: ttl, the chain key after the conversation's id (from its '/'; '' for none), the conversation's id, the
-- registry's UUID key prefix. A live durable conversation keeps its chains in its hash (see the layout), its
-- own thread being its initiator's chain unless the hash says otherwise.
local uuid_prefix, durable = ARGV[4], true
-- (the functions of _LIVE_REGISTRATIONS)
return (chain_thread(KEYS[1], ARGV[2] ~= '' and KEYS[2] or nil, ARGV[2], ARGV[3], tonumber(ARGV[1]), false))
""")


_THREAD_CHAIN = """
-- The chain key of a UUID. KEYS: its registry key, and the hash of the durable conversation it would be the
-- own thread of; ARGV: ttl, the UUID. Such a thread has no key: its conversation's hash stands for it, unless
-- its chain's field says the thread was forgotten, or the chain registered again (see _LIVE_REGISTRATIONS).
local chain = redis.call('GET', KEYS[1])
if chain then
  if tonumber(ARGV[1]) > 0 and redis.call('TTL', KEYS[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
  return chain
end
local initiator = redis.call('HGET', KEYS[2], 'initiator')
if initiator then
  local current = redis.call('HGET', KEYS[2], '/' .. initiator)
  if not current or current == ARGV[2] then return ARGV[2] .. '/' .. initiator end
end
return false
"""


_OWN_THREADS = """
-- KEYS: durable conversations' hashes. For each, its initiator when the hash stands for its own thread (the
-- conversation lives, and its own chain was neither forgotten nor registered again), else ''.
local found = {}
for k, key in ipairs(KEYS) do
  local initiator = redis.call('HGET', key, 'initiator')
  if initiator and redis.call('HEXISTS', key, '/' .. initiator) == 0 then found[k] = initiator else found[k] = '' end
end
return found
"""


_FORGET_LIVE_THREADS = """
-- KEYS: durable conversations' hashes. Each forgets the threads it registers (as _APPLY's 'f' would, one by
-- one): the fields of its chains go, its own chain stays, as no one's; the '#' fields stay, for its end.
for _, key in ipairs(KEYS) do
  local initiator = redis.call('HGET', key, 'initiator')
  if initiator then
    local chains = {}
    for _, name in ipairs(redis.call('HKEYS', key)) do
      if string.byte(name, 1) == 47 then chains[#chains + 1] = name end  -- '/'
    end
    for from = 1, #chains, 1000 do
      redis.call('HDEL', key, unpack(chains, from, math.min(from + 999, #chains)))
    end
    redis.call('HSET', key, '/' .. initiator, '')
  end
end
return 0
"""


_REFRESH = """
-- KEYS: a history list; ARGV: ttl. A read refreshes the TTL of what it reads only when it has one (so do the
-- registry's reads, _CHAIN_THREAD and _THREAD_CHAIN): the durable engine keeps a live conversation's history
-- and thread registrations without a TTL (its end deletes them), and a handler's look at them must not make
-- them expire.
local value = redis.call('LRANGE', KEYS[1], 0, -1)
if redis.call('TTL', KEYS[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return value
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
        url: str = DEFAULT_URL,
        prefix: str = DEFAULT_PREFIX,
        ttl: int = DEFAULT_TTL,
        *,
        retries: int = 3,
        socket_timeout: float = 2.0,
        fail_fast_seconds: float | None = 1.0,
    ) -> None:
        """``socket_timeout`` bounds how long one call may wait for an answer (a
        timed-out call is not retried: it may have run); ``fail_fast_seconds``
        is the circuit's ``retry_after`` (see :mod:`xml_pipeline.memory.circuit`)."""
        if ttl < 0:
            raise ValueError("ttl must be 0 (keys never expire) or a number of seconds")
        self.spec = RedisSpec(url, prefix, ttl)
        self.socket_timeout = socket_timeout
        self._retries = retries
        self.prefix = prefix
        self.ttl = ttl
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries, supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError],
            health_check_interval=30,
        )
        self._apply = self._client.register_script(_APPLY)
        self._get_or_set = self._client.register_script(_GET_OR_SET)
        self._refresh = self._client.register_script(_REFRESH)
        self._chain_thread = self._client.register_script(_CHAIN_THREAD)
        self._thread_chain = self._client.register_script(_THREAD_CHAIN)
        self._own_threads = self._client.register_script(_OWN_THREADS)
        self._forget_live_threads = self._client.register_script(_FORGET_LIVE_THREADS)
        self.circuit = Circuit(retry_after=fail_fast_seconds)

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

    def _conversation_key(self, conversation: str) -> str:
        return f"{self.prefix}conv:{conversation}"

    def _touch(self, pipe: Any, key: str) -> None:
        """Refresh ``key``'s TTL in ``pipe``; with ttl 0 keys never expire, so nothing to refresh."""
        if self.ttl > 0:
            pipe.expire(key, self.ttl)

    def _run(self, operation: Any, *args: Any, **kwargs: Any) -> Any:
        with self._answering():
            return operation(*args, **kwargs)

    @contextlib.contextmanager
    def _answering(self) -> Iterator[None]:
        """Around one call to Redis (on either client): the circuit's check first, and Redis's failures as
        BackendUnavailable, an unreachable server also tripping the circuit."""
        self.circuit.check()
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unreachable(exc) from None
        except RedisError as exc:
            raise BackendUnavailable(f"redis refused the operation: {exc}") from None

    def _unreachable(self, exc: Exception) -> BackendUnavailable:
        reason = f"redis is unreachable: {exc}"
        self.circuit.trip(reason)
        return BackendUnavailable(reason)

    def _scan(self, pattern: str) -> Iterator[bytes]:
        """Keys matching ``pattern``, which starts with the prefix; the prefix is matched literally."""
        self.circuit.check()
        try:
            yield from self._client.scan_iter(match=glob_under(self.prefix, pattern), count=SCAN_BATCH)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._unreachable(exc) from None

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

    # --- writes: every one goes through the batch script ---
    def apply(self, ops: Sequence[StateOp]) -> list[object]:
        """All of ``ops`` in one script call: one round trip, atomic, in order.

        redis-py calls the script by SHA and loads it if the server has lost it
        (a restart, SCRIPT FLUSH); a refused call never ran, so nothing runs twice.
        """
        if not ops:
            return []
        return _outcomes(ops, self._run(self._apply, keys=[], args=self._apply_args(ops)))

    def _apply_args(self, ops: Sequence[StateOp]) -> list[Any]:
        args: list[Any] = []
        slots: list[bytes] = []
        for op in ops:
            if type(op) is AppendSlot:
                slots.append(op.slot)
                args += ("a", op.thread_id, len(slots), _cap(op.max_slots), _cap(op.max_threads))
            elif type(op) is RegisterThread:
                args += ("r", op.chain, op.uuid)
            elif type(op) is ForgetThread:
                args += ("f", op.uuid)
            elif type(op) is DeleteHistory:
                args += ("d", op.thread_id)
            else:
                raise TypeError(f"not a state op: {op!r}")
        packed = msgpack.packb(args, use_bin_type=False)  # Redis's cmsgpack reads raw strings, not bin
        return [self.prefix, self.ttl, packed, *slots]

    @contextlib.asynccontextmanager
    async def writer(self) -> AsyncIterator[AsyncStateWriter]:
        """An event-loop client for :meth:`apply`, for as long as the block runs.

        The pump's batch of state writes then travels while the pump goes on
        with other messages, instead of holding its event loop for the round
        trip and for Redis's work on the batch (about a quarter of its time).
        """
        client = aioredis.Redis.from_url(
            self.spec.url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            # The event-loop client's own Retry: the synchronous one would hand back the call's coroutine at
            # once, and a closed connection (a restart) would then fail the batch instead of being retried.
            retry=redis.asyncio.retry.Retry(
                ExponentialBackoff(cap=1.0, base=0.05), self._retries, supported_errors=(RedisConnectionError,)
            ),
            retry_on_error=[RedisConnectionError],
        )
        try:
            yield AsyncStateWriter(self, client)
        finally:
            await client.aclose()

    def _apply_one(self, op: StateOp) -> object:
        outcome = self.apply([op])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # --- context buffer ---
    def buffer_append(
        self, thread_id: str, slot_data: bytes, *, max_slots: int | None = None, max_threads: int | None = None
    ) -> int:
        index = self._apply_one(AppendSlot(thread_id, slot_data, max_slots, max_threads))
        assert isinstance(index, int)
        return index

    def buffer_get_thread(self, thread_id: str) -> list[bytes]:
        key = self._buffer_key(thread_id)
        if self.ttl > 0:  # the TTL refreshed only if it has one (see _REFRESH)
            slots = self._run(self._refresh, keys=[key], args=[self.ttl])
        else:
            slots = self._run(self._client.lrange, key, 0, -1)
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
        return bool(self._apply_one(DeleteHistory(thread_id)))

    def buffer_list_threads(self) -> list[str]:
        start = len(self._buffer_key(""))
        return [key.decode()[start:] for key in self._scan(self._buffer_key("*"))]

    def buffer_clear(self) -> None:
        self._unlink_matching(self._buffer_key("*"))
        self._run(self._client.unlink, self._index_key)

    # --- thread registry ---
    def registry_set(self, chain: str, uuid: str) -> None:
        self._apply_one(RegisterThread(chain, uuid))

    def registry_get_or_set(self, chain: str, uuid: str) -> str:
        conversation, rest = _conversation_of(chain)
        keys = [self._chain_key(chain), self._uuid_key(uuid), self._conversation_key(conversation)]
        args = [uuid, chain, self.ttl, self._uuid_key(""), rest, conversation]
        result = self._run(self._get_or_set, keys=keys, args=args)
        return result.decode() if isinstance(result, bytes) else str(result)

    def registry_get_uuid(self, chain: str) -> str | None:
        conversation, rest = _conversation_of(chain)
        keys = [self._chain_key(chain), self._conversation_key(conversation)]
        args = [self.ttl, rest, conversation, self._uuid_key("")]
        result = self._run(self._chain_thread, keys=keys, args=args)
        return result.decode() if result is not None else None

    def registry_get_chain(self, uuid: str) -> str | None:
        keys = [self._uuid_key(uuid), self._conversation_key(uuid)]
        result = self._run(self._thread_chain, keys=keys, args=[self.ttl, uuid])
        return result.decode() if result is not None else None

    def registry_delete(self, uuid: str) -> bool:
        return bool(self._apply_one(ForgetThread(uuid)))

    def registry_list_all(self) -> dict[str, str]:
        keys = list(self._scan(self._uuid_key("*")))
        start = len(self._uuid_key(""))
        found: dict[str, str] = {}
        for offset in range(0, len(keys), SCAN_BATCH):
            batch = keys[offset : offset + SCAN_BATCH]
            for key, chain in zip(batch, self._run(self._client.mget, batch), strict=True):
                if chain is not None:  # expired between SCAN and MGET
                    found[key.decode()[start:]] = chain.decode()
        # The own threads of live durable conversations, which their hashes stand for.
        conversations = list(self._scan(self._conversation_key("*")))
        start = len(self._conversation_key(""))
        for offset in range(0, len(conversations), SCAN_BATCH):
            batch = conversations[offset : offset + SCAN_BATCH]
            for key, initiator in zip(batch, self._run(self._own_threads, keys=batch), strict=True):
                if initiator:  # '' when it ended between SCAN and the script, or its own thread was forgotten
                    conversation = key.decode()[start:]
                    found[conversation] = f"{conversation}/{initiator.decode()}"
        return found

    def registry_clear(self) -> None:
        self._unlink_matching(f"{self.prefix}reg:*")
        conversations = list(self._scan(self._conversation_key("*")))  # the threads live conversations register
        for offset in range(0, len(conversations), SCAN_BATCH):
            self._run(self._forget_live_threads, keys=conversations[offset : offset + SCAN_BATCH])

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
        self._touch(pipe, key)
        written = self._run(pipe.execute)[0]
        return bool(written) or not only_if_absent

    def record_get(self, kind: str, record_id: str) -> dict[str, bytes]:
        key = self._record_key(kind, record_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(key)
        self._touch(pipe, key)
        fields = self._run(pipe.execute)[0]
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
        """Ask Redis for real, past an open circuit; an answer closes the circuit."""
        try:
            answered = bool(self._client.ping())
        except (RedisConnectionError, RedisTimeoutError) as exc:
            self._unreachable(exc)
            return False
        except RedisError:
            return False
        if answered:
            self.circuit.reset()
        return answered

    def info(self) -> dict[str, Any]:
        server = self._run(self._client.info, "server")
        now = int(self._run(self._client.time)[0])
        live_threads = self._run(self._client.zcount, self._index_key, f"({now}", "+inf")
        return {
            "type": "redis",
            "buffer_threads": int(live_threads),
            "registry_entries": len(self.registry_list_all()),  # a live durable conversation's own thread has no key
            "ttl_seconds": self.ttl,
            "prefix": self.prefix,
            "redis_version": server.get("redis_version"),
        }

    def keys(self) -> list[str]:
        """Every key under this backend's prefix (SCAN), for tests and operators."""
        return sorted(key.decode() for key in self._scan(f"{self.prefix}*"))

    def close(self) -> None:
        self._client.close()


def _conversation_of(chain: str) -> tuple[str, str]:
    """A chain key as the conversation it names and the rest from its ``/``; ``("", "")`` for a key that names
    none (the reference's dotted keys, and the shared namespace's)."""
    conversation, slash, rest = chain.partition("/")
    return (conversation, slash + rest) if conversation and slash else ("", "")


def glob_under(prefix: str, pattern: str) -> str:
    """``pattern`` (which starts with ``prefix``) as a SCAN pattern that takes the prefix literally.

    A prefix with glob characters (``a*``) would otherwise match other
    organisms' keys, and a clear() would delete them.
    """
    literal = "".join("\\" + char if char in "*?[]\\" else char for char in prefix)
    return literal + pattern.removeprefix(prefix)


class AsyncStateWriter:
    """:meth:`RedisBackend.apply` on an event-loop client: the same script, errors and circuit."""

    def __init__(self, backend: RedisBackend, client: aioredis.Redis) -> None:
        self._backend = backend
        self._script = client.register_script(_APPLY)

    async def apply(self, ops: Sequence[StateOp]) -> list[object]:
        if not ops:
            return []
        with self._backend._answering():
            raw: Any = await self._script(keys=[], args=self._backend._apply_args(ops))
        return _outcomes(ops, raw)


def _cap(limit: int | None) -> int:
    """A cap as the batch script reads it: -1 for none."""
    return -1 if limit is None else limit


def _outcomes(ops: Sequence[StateOp], raw: Sequence[Any]) -> list[object]:
    """The batch script's answer, one value per op, as each op's outcome."""
    return [_outcome(op, int(value)) for op, value in zip(ops, raw, strict=True)]


def _outcome(op: StateOp, value: int) -> object:
    """What the backend method for ``op`` would return, or the exception it would raise."""
    if type(op) is AppendSlot:
        if value == -1:
            return BufferFull(f"thread {op.thread_id} holds {op.max_slots} slots already")
        if value == -2:
            return TooManyThreads(f"the buffer holds {op.max_threads} threads already")
        return value
    if type(op) is RegisterThread:
        return None
    return bool(value)
