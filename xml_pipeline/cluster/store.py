"""The durable engine's Redis: keys, the one script that writes, and the reads around it.

Keys, under the organism's prefix (shared with the thread registry and the
context buffer, whose layout is :mod:`xml_pipeline.memory.redis_backend`'s)::

    {prefix}s:{listener}          STREAM  hops waiting for or being handled by ``listener``
    {prefix}conv:{conversation}   HASH    initiator, pending (hops stored and not yet committed), owner (the
                                          identity of the client that opened it, with tokens only), opener
                                          (the daemon whose door stored its latest client message), replied
                                          ('0' until a step writes a reply while it lives, so that its end
                                          knows whether its replies are all of the stream), and its
                                          threads: ``/{chain}`` -> thread (the chain's registration, the
                                          chain key after the conversation's id), ``#{thread}`` for each
                                          thread whose ``reg:u`` key it wrote, to delete at the end; its own
                                          thread (the conversation's id) needs neither
    {prefix}r:{conversation}      STREAM  replies for the client, then the end (an entry of its own, or
                                          the last reply's ``end`` field when one step wrote both)
    {prefix}r-owner:{conv}        STRING  after the end, the owner, kept as long as the replies
    {prefix}cont:{thread}         STRING  a client's continuation stored on hop thread ``thread`` (expires
                                          after the reply retention), so a retried store writes nothing twice
    {prefix}dlq                   STREAM  hops that failed ``max_deliveries`` times
    {prefix}durable               STRING  '1': the prefix holds durable conversations (their registrations
                                          in their hashes, which the registry then looks for)
    {prefix}daemon:{id}           STRING  a live daemon's heartbeat (JSON, with a TTL)
    {prefix}inbox:{id}            STREAM  the conversations another daemon wrote replies for, which daemon
                                          ``id`` opened (its replies' waiters are there); TTL as the heartbeat

Every state change is a commit in ``_COMMIT``: it acknowledges and deletes the
hop it finishes (or, at the door, checks the target's backlog and opens the
conversation), adjusts the conversation's pending count, adds the hops it
produced to their streams, appends history, registers threads, and, when the
count reaches zero, deletes the conversation's state (a step that ends it
writes no history or threads, only its replies) and only then writes the
``end`` entry its client waits for. All or nothing: a daemon that dies before
the call leaves the hop pending, to be handled again; one that dies after it
has nothing left to do. A hop that is no longer pending when its commit runs
(another daemon claimed and finished it) changes nothing. The commits of one
loop turn travel in one script call, each still all or nothing on its own.

Acknowledged entries are deleted at once, so a stream holds only work not yet
done, and its length is the listener's backlog. A live conversation's keys
(its hash, history and registry keys) carry no TTL: the pending count ends
every conversation, and the end deletes them. What has no end of its own
expires: replies and owner after the reply retention, continuation marks,
heartbeats.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from xml_pipeline.cluster.batching import Batcher
from xml_pipeline.cluster.hop import Hop
from xml_pipeline.memory.redis_backend import glob_under
from xml_pipeline.message.envelope import MESSAGE_END

GROUP = "xml-pipeline"
MAX_CONNECTIONS = 64
"""Connections one daemon opens to Redis at most; further calls wait (bounded) for a free one."""
COMMITS_PER_CALL = 128
"""Commits one script call carries at most: enough to pay a call's cost once per loop turn under load,
few enough that Redis, which runs a script alone, is never held for long."""

_COMMIT = """
-- One call commits a batch: ARGV = prefix, group, reply retention, the committing daemon, then each commit:
-- a MessagePack array
-- (one argument, not dozens: each argument costs the client and Redis alike, whatever its size) followed
-- by its blobs, the payloads, as arguments of their own (so their bytes are neither unpacked nor sent
-- twice: a hop's payload is also its history slot's). The array holds:
--   input stream ('' at the door), input id, conversation, backlog cap (-1: none), capped stream,
--   initiator ('' unless opening or continuing), owner (the client's identity, '' for none; checked when
--   continuing),
--   continues (the new hop's thread when a client continues its conversation, else ''),
--   hops (the h ops' count), blobs (how many arguments follow the array),
--   unless live (when opening: a conversation id; if it is live, this initiator's and this owner's, nothing
--   is written and the answer is 4, so that the client continues it instead; '' for none), then the ops:
--   h stream header blob (a hop: its stream entry's two fields, the payload that blob) |
--   y envelope-blob type payload-offset |
--   a slot | p head blob first last (a slot: head, then the blob's bytes first..last; a hop whose slot is
--   in the same commit sends the slot as its payload's blob, its header saying where the payload starts,
--   and the slot's op names that blob whole with an empty head, so that no slot is joined in Lua) |
--   r chain uuid (a thread other than the conversation's own: its chain key after the conversation's id) |
--   q n field value ...
-- After the array comes hand over, decided as late as possible (at the call): '1' when a client waits on
-- this daemon for the conversation's end; then if this step ends it, it was opened here and wrote no reply
-- before, its replies and end go straight to that client and are not stored; '' otherwise. Then the blobs.
-- Answers per commit, in order: written, ended, fresh, n, then the ids of the n reply-stream entries it wrote;
-- fresh is 1 when the reply stream held nothing before them (so they are all of it), 2 when the step ended the
-- conversation and handed its replies over (nothing stored: n is 1, the owner, for the caller to store them
-- after all should the waiter be gone). Written is 1, 0 (the
-- hop was no longer pending:
-- nothing written), 2 (that opening was stored already), 3 (the conversation to continue is not live,
-- or not this initiator's: nothing written), 4 (opening, but the conversation named unless-live is live and
-- this client's: nothing written) or -1 (the capped stream was full).
--
-- A live conversation's state has no TTL: it lasts exactly as long as the conversation, which the pending
-- count ends (a hop is always committed or dead-lettered). A TTL could only expire the state of a
-- conversation whose hop waits in a long backlog. Its hash holds, besides initiator, pending and owner, the
-- registrations of its threads (the registry's layout, redis_backend, reads them there), so that a thread
-- costs one registry key (for lookups by thread) instead of two, and the end deletes them in one UNLINK.
--
-- A conversation's replies are waited for on the daemon that opened it (its door stored the client's
-- message); a step committed on another daemon tells that one, in its inbox, which conversation has news.
-- A daemon's inbox lives only while the daemon does (NOMKSTREAM: a gone daemon's is not made again).
local prefix, group, retention, me = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local uuid_prefix = prefix .. 'reg:u:'
local answers = {}
local EMPTY = {}

-- Redis's Lua hashes every byte of every string it makes, and each closure and table costs an allocation:
-- the helpers below live once per call, not once per commit, and a commit makes only the strings and tables
-- its own path uses (see docs/benchmarks.md, Issue 12, third session).

local function field_of(state, name)
  -- A field's value in a hash as HGETALL answers it (nil when it has none).
  for k = 1, #state, 2 do
    if state[k] == name then return state[k + 1] end
  end
end

local function full(cap, capped)
  -- The backlog cap is checked after the idempotency checks: a retry of a store that went through is
  -- answered as stored, not refused as overload because the stream filled meanwhile.
  return cap >= 0 and redis.call('XLEN', capped) >= cap
end

local function add_reply(conv, ids, fields, fresh)
  -- Appends a reply entry to the conversation's reply stream; the ids so far (a table made at the first),
  -- and the answer's fresh: whether the stream held nothing before this commit's replies.
  local replies_key = prefix .. 'r:' .. conv
  if fresh == nil then fresh = redis.call('XLEN', replies_key) == 0 end
  ids = ids or {}
  ids[#ids + 1] = redis.call('XADD', replies_key, '*', unpack(fields))
  return ids, fresh
end

local function tell_opener(conv, opener)
  if opener and opener ~= '' and opener ~= me then
    redis.call('XADD', prefix .. 'inbox:' .. opener, 'NOMKSTREAM', 'MAXLEN', '~', 10000, '*', 'c', conv)
  end
end

local function answer(written, ended, fresh, ids)
  local n = #answers
  answers[n + 1], answers[n + 2] = written, ended
  if not ids then
    answers[n + 3], answers[n + 4] = 0, 0
    return
  end
  answers[n + 3], answers[n + 4] = fresh, #ids
  for j = 1, #ids do answers[n + 4 + j] = ids[j] end
end

local function commit(c, base)
  local stream, id, conv, cap, capped, initiator, owner = c[1], c[2], c[3], c[4], c[5], c[6], c[7]
  local continues, hops, unless_live, hand_over = c[8], c[9], c[11], ARGV[base] == '1'
  local first, last = 12, #c
  local conv_key = prefix .. 'conv:' .. conv
  local pending
  local state = nil  -- the conversation's hash as HGETALL answers it, read when its end is likely
  local opening = initiator ~= '' and continues == ''
  if stream ~= '' then
    if redis.call('XACK', stream, group, id) == 0 then
      return answer(0, 0)
    end
    redis.call('XDEL', stream, id)
    if hops == 0 then
      -- A step that sends no hop most often ends its conversation, and its end reads the hash anyway:
      -- read it first, and count down only if other hops are still pending (then no end to read it for).
      state = redis.call('HGETALL', conv_key)
      pending = (tonumber(field_of(state, 'pending')) or 0) - 1
      if pending > 0 then redis.call('HINCRBY', conv_key, 'pending', -1) end
    else
      pending = redis.call('HINCRBY', conv_key, 'pending', hops - 1)
    end
  elseif continues ~= '' then
    -- A client's message on its own live conversation: only while it lives, and only its initiator's.
    -- Idempotent as an opening is: a retry finds its mark, which outlives the conversation (the hop it
    -- stored may end it before the retry comes, and NotLive would then store the message again).
    local mark = prefix .. 'cont:' .. continues
    if redis.call('EXISTS', mark) == 1 then
      return answer(2, 0)
    end
    -- The same name is not the same client: one with a token continues only its own, one without
    -- (on the socket, any name will do) only one opened without.
    local found = redis.call('HMGET', conv_key, 'initiator', 'owner')
    if found[1] ~= initiator or (found[2] or '') ~= owner then
      return answer(3, 0)
    end
    if full(cap, capped) then return answer(-1, 0) end
    redis.call('SET', mark, '1', 'EX', retention)
    pending = redis.call('HINCRBY', conv_key, 'pending', hops)
    redis.call('HSET', conv_key, 'opener', me)  -- the client now waits on this daemon
  elseif not opening then
    pending = redis.call('HINCRBY', conv_key, 'pending', hops)
  else
    -- Opening is idempotent: a retry of this very call (same conversation id) after a lost answer
    -- finds the conversation (or its replies) there already and writes nothing twice. And a client's
    -- message on a thread that names its own live conversation continues it: the door asks here rather
    -- than in a call of its own before every opening. One look for both, as neither is the common case.
    local replies_key = prefix .. 'r:' .. conv
    local live_key = unless_live ~= '' and prefix .. 'conv:' .. unless_live or nil
    local seen
    if live_key then
      seen = redis.call('EXISTS', conv_key, replies_key, live_key)
    else
      seen = redis.call('EXISTS', conv_key, replies_key)
    end
    if seen > 0 then
      if not live_key or redis.call('EXISTS', conv_key, replies_key) > 0 then
        return answer(2, 0)
      end
      local found = redis.call('HMGET', live_key, 'initiator', 'owner')
      if found[1] == initiator and (found[2] or '') == owner then
        return answer(4, 0)
      end
    end
    if full(cap, capped) then return answer(-1, 0) end
    pending = hops
  end
  -- A step that ends its conversation writes no history and no threads: the end deletes them.
  local ending = pending <= 0
  if ending and not state then state = redis.call('HGETALL', conv_key) end
  local history, registered, named
  local last_reply = nil  -- written after the loop: a step that ends its conversation adds the end to it
  local ids, fresh = nil, nil
  local replied = state and field_of(state, 'replied')
  if replied then
    -- The hash says whether replies were written before (a conversation opened by an earlier daemon
    -- does not: then the stream's length does).
    fresh = replied == '0'
  end
  local i = first
  while i <= last do
    local code = c[i]
    if code == 'h' then
      redis.call('XADD', c[i + 1], '*', 'h', c[i + 2], 'payload', ARGV[base + c[i + 3]])
      i = i + 4
    elseif code == 'q' then
      local count = tonumber(c[i + 1])
      redis.call('XADD', prefix .. 'dlq', '*', unpack(c, i + 2, i + 1 + 2 * count))
      i = i + 2 + 2 * count
    elseif code == 'y' then
      if last_reply then ids, fresh = add_reply(conv, ids, last_reply, fresh) end
      last_reply = {'reply', ARGV[base + c[i + 1]], 'type', c[i + 2], 'at', c[i + 3]}
      i = i + 4
    elseif code == 'a' then
      if not ending then
        history = history or {}
        history[#history + 1] = c[i + 1]
      end
      i = i + 2
    elseif code == 'p' then
      if not ending then
        local head, blob, from, to = c[i + 1], ARGV[base + c[i + 2]], c[i + 3], c[i + 4]
        -- Cutting a blob whole, or joining it to an empty head, would hash its every byte again only to make
        -- the same string: a hop's blob is often its whole slot already.
        if from ~= 1 or to ~= #blob then blob = string.sub(blob, from, to) end
        history = history or {}
        history[#history + 1] = head == '' and blob or head .. blob
      end
      i = i + 5
    elseif code == 'r' then
      -- A thread other than the conversation's own (whose hash is its registration): its chain (after the
      -- conversation's id, as the op gives it) names it in the hash, and a registry key names its whole
      -- chain, for lookups by thread; the hash also names that key's thread, so the end deletes the key
      -- even after a later thread took the chain over.
      if not ending then
        local suffix, uuid = c[i + 1], c[i + 2]
        registered, named = registered or {}, named or {}
        local n = #registered
        registered[n + 1], registered[n + 2] = uuid_prefix .. uuid, conv .. suffix
        n = #named
        named[n + 1], named[n + 2], named[n + 3], named[n + 4] = suffix, uuid, '#' .. uuid, ''
      end
      i = i + 3
    else
      return redis.error_reply('unknown op ' .. tostring(code))
    end
  end
  if last_reply and not ending then
    -- Replies written while it lives: its end cannot take them as all of the stream's.
    named = named or {}
    named[#named + 1], named[#named + 2] = 'replied', '1'
  end
  if opening then
    if owner ~= '' then
      redis.call('HSET', conv_key, 'initiator', initiator, 'pending', hops, 'opener', me, 'replied', '0',
        'owner', owner, unpack(named or EMPTY))
    else
      redis.call('HSET', conv_key, 'initiator', initiator, 'pending', hops, 'opener', me, 'replied', '0',
        unpack(named or EMPTY))
    end
  elseif named then
    redis.call('HSET', conv_key, unpack(named))
  end
  if not ending then
    if last_reply then ids, fresh = add_reply(conv, ids, last_reply, fresh) end
    if history then
      redis.call('RPUSH', prefix .. 'buf:' .. conv, unpack(history))
    end
    if registered then
      redis.call('MSET', unpack(registered))
    end
    if ids then
      tell_opener(conv, state and field_of(state, 'opener') or redis.call('HGET', conv_key, 'opener'))
    end
    return answer(1, 0, fresh and 1 or 0, ids)
  end
  local keys, keep_owner, opener = {conv_key, prefix .. 'buf:' .. conv}, '', ''
  -- A field is cut to compare with the legacy prefix only when its first byte is that prefix's (cutting
  -- every field would make a string of each), whatever that byte is, '#' and '/' included.
  local legacy = prefix .. 'reg:'
  local legacy_first = string.byte(legacy, 1)
  for k = 1, #state, 2 do
    local name = state[k]
    local first_byte = string.byte(name, 1)
    if name == 'owner' then
      keep_owner = state[k + 1]
    elseif name == 'opener' then
      opener = state[k + 1]
    elseif first_byte == legacy_first and string.sub(name, 1, #legacy) == legacy then
      -- A registry key by its name: how daemons before 2026-12-02 kept them, for a conversation they opened
      -- that ends after an upgrade.
      keys[#keys + 1] = name
    elseif first_byte == 35 then  -- '#': a thread whose registry key this conversation wrote
      keys[#keys + 1] = uuid_prefix .. string.sub(name, 2)
    end
  end
  -- In slices: however many threads it had, never more values than one unpack takes (about 8,000).
  for from = 1, #keys, 1000 do
    redis.call('UNLINK', unpack(keys, from, math.min(from + 999, #keys)))
  end
  if hand_over and opener == me and replied == '0' then
    -- Its client waits here and takes every reply with the end: a reply stream made to be deleted a moment
    -- later would cost Redis more than the rest of the step.
    return answer(1, 1, 2, {keep_owner})
  end
  if last_reply then
    last_reply[#last_reply + 1] = 'end'
    last_reply[#last_reply + 1] = '1'
    ids, fresh = add_reply(conv, ids, last_reply, fresh)
  else
    ids, fresh = add_reply(conv, ids, {'end', '1'}, fresh)
  end
  tell_opener(conv, opener)
  redis.call('EXPIRE', prefix .. 'r:' .. conv, retention)
  if keep_owner ~= '' then
    -- Who may collect the replies, kept as long as they are.
    redis.call('SET', prefix .. 'r-owner:' .. conv, keep_owner, 'EX', retention)
  end
  return answer(1, 1, fresh and 1 or 0, ids)
end

local k = 5
while k <= #ARGV do
  local c = cmsgpack.unpack(ARGV[k])
  local failed = commit(c, k + 1)
  if failed then return failed end  -- an error reply
  k = k + 2 + c[10]
end
return answers
"""


_LOOK = """
-- ARGV: prefix, then conversation ids; answers per id: the owner's identity ('' for none), and 1 when the
-- conversation is known (live, or its replies still kept), else 0.
-- A live conversation keeps its owner in its hash; an ended one, beside its replies.
local prefix, found = ARGV[1], {}
for i = 2, #ARGV do
  local conv = ARGV[i]
  local live = redis.call('HGET', prefix .. 'conv:' .. conv, 'owner')
  if live then
    found[#found + 1] = live
    found[#found + 1] = 1
  else
    found[#found + 1] = redis.call('GET', prefix .. 'r-owner:' .. conv) or ''
    found[#found + 1] = redis.call('EXISTS', prefix .. 'conv:' .. conv, prefix .. 'r:' .. conv) > 0 and 1 or 0
  end
end
return found
"""


@dataclass(frozen=True, slots=True)
class ClientReply:
    """A reply for the conversation's initiator: the envelope a client reads, and the payload a caller decodes.

    Redis keeps the envelope alone and where the payload lies in it: the
    payload's bytes are stored (and sent through the commit script) once.
    """

    envelope: bytes
    payload_type: str
    payload_xml: bytes

    @property
    def payload_span(self) -> tuple[int, int]:
        """Where the payload lies in the envelope (start, end), as a reply entry's ``at`` field says it: it ends
        where the envelope's closing tag starts."""
        end = len(self.envelope) - len(MESSAGE_END)
        return end - len(self.payload_xml), end


@dataclass(frozen=True, slots=True)
class Committed:
    """What a commit wrote for its conversation's client."""

    ended: bool
    """The conversation ended (and its state is gone)."""
    reply_ids: list[bytes]
    """The ids of the reply-stream entries it wrote, in order (the last one holds the end, if it ended)."""
    fresh: bool
    """The reply stream held nothing before them: they are all of it, and a waiter here may take them as read."""
    handed: bool = False
    """It ended the conversation and stored nothing for the client: its replies and end are the waiter's here."""
    owner: str = ""
    """When handed: the identity of the client that opened it ('' for none), should they be stored after all."""


NO_REPLIES = Committed(False, [], False)


@dataclass(slots=True)
class RepliesRead:
    replies: dict[str, list[tuple[bytes, ClientReply | None]]]
    """Per conversation, its new entries: (id, reply), with None for the end."""
    notices: list[str]
    """Conversations this daemon opened that another daemon wrote replies for."""
    inbox_after: bytes | None
    """Where the next read of the inbox starts."""


class BacklogFull(Exception):
    """The target's stream already holds as many hops as the organism allows."""


class NotLive(Exception):
    """The conversation a client meant to continue is over (or was never its own): nothing was written."""


class StillLive(Exception):
    """An opening's thread names the client's own live conversation, to be continued instead: nothing was written."""


@dataclass(slots=True)
class Effects:
    """Everything one step produces, written by one commit."""

    hops: list[Hop] = field(default_factory=list)
    replies: list[ClientReply] = field(default_factory=list)
    history: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Slots, each with the payload it ends with (a hop's or a reply's), which then travels only once."""
    registrations: list[tuple[str, str]] = field(default_factory=list)
    dead_letters: list[list[bytes | str]] = field(default_factory=list)

    def arguments(self, keys: Keys, conversation: str) -> tuple[list[bytes | str | int], list[bytes]]:
        """The ops for the commit script, and the blobs (payloads) they refer to by number from 1.

        A hop whose history slot is in this commit travels as that slot, its header saying where its payload
        starts, so the script stores one blob twice instead of joining a slot in Lua (which hashes every byte
        it makes: the join was about 6% of the instructions Redis ran per one-hop conversation, docs/benchmarks.md).
        """
        args: list[bytes | str | int] = []
        blobs: list[bytes] = []
        where: dict[int, tuple[int, int, int]] = {}
        """By the id of a payload object: its blob, and where in the blob it lies (1-based, inclusive)."""
        whole: dict[int, int] = {}
        """By the id of a history slot sent as its hop's blob: that blob."""
        slots: dict[int, list[bytes]] = {}
        """By the id of a payload object: the history slots that end with it, not yet paired with a hop."""
        for slot, payload in self.history:
            if payload and slot.endswith(payload):
                slots.setdefault(id(payload), []).append(slot)
        for chain, uuid in self.registrations:
            if uuid != conversation:  # the conversation's own thread: its hash is its registration
                args += ["r", chain[len(conversation) :], uuid]
        for hop in self.hops:
            paired = slots.get(id(hop.payload_xml))
            payload_at = 0
            if paired:
                slot = paired.pop(0)
                blobs.append(slot)
                whole[id(slot)] = len(blobs)
                payload_at = len(slot) - len(hop.payload_xml)
            else:
                blobs.append(hop.payload_xml)
                where[id(hop.payload_xml)] = (len(blobs), 1, len(hop.payload_xml))
            args += ["h", keys.stream(hop.target), hop.header(payload_at), len(blobs)]
        for reply in self.replies:
            blobs.append(reply.envelope)
            start, end = reply.payload_span
            where[id(reply.payload_xml)] = (len(blobs), start + 1, end)
            args += ["y", len(blobs), reply.payload_type, f"{start}:{end}"]
        for slot, payload in self.history:
            number = whole.get(id(slot))
            found = where.get(id(payload))
            if number is not None:
                args += ["p", "", number, 1, len(slot)]
            elif found is not None and payload and slot.endswith(payload):
                args += ["p", slot[: len(slot) - len(payload)], *found]
            else:
                args += ["a", slot]
        for letter in self.dead_letters:
            args += ["q", len(letter) // 2, *letter]
        return args, blobs


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def stream(self, listener: str) -> str:
        return f"{self.prefix}s:{listener}"

    def conversation(self, conversation: str) -> str:
        return f"{self.prefix}conv:{conversation}"

    def replies(self, conversation: str) -> str:
        return f"{self.prefix}r:{conversation}"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}dlq"

    def reply_owner(self, conversation: str) -> str:
        return f"{self.prefix}r-owner:{conversation}"

    @property
    def durable_marker(self) -> str:
        return f"{self.prefix}durable"

    def daemon(self, daemon_id: str) -> str:
        return f"{self.prefix}daemon:{daemon_id}"

    def inbox(self, daemon_id: str) -> str:
        return f"{self.prefix}inbox:{daemon_id}"


@dataclass(frozen=True, slots=True)
class PendingEntry:
    entry_id: bytes
    consumer: str
    idle_ms: int
    deliveries: int


class ClusterStore:
    """The async Redis client of one daemon, and the few operations the engine needs."""

    def __init__(
        self, url: str, prefix: str, *, socket_timeout: float, reply_retention: float, daemon_id: str = ""
    ) -> None:
        self.keys = Keys(prefix)
        self.daemon_id = daemon_id
        """Whose commits these are: conversations this store opens name it as where their replies are awaited."""
        self.reply_retention = max(1, round(reply_retention))
        """Seconds an ended conversation's replies are kept for its client (the organism's setting)."""
        # A connection Redis closed (a restart) is retried on a fresh one. Retrying a commit is safe: one
        # that did run has acknowledged its hop, and its repeat then changes nothing.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3, supported_errors=(RedisConnectionError,)),
            retry_on_error=[RedisConnectionError],
        )
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # Hops are read as Redis answers them: the client's own parsing of each entry into a dict cost more
        # than reading the hop itself. Nothing else reads a group on this client.
        self.client.set_response_callback("XREADGROUP", _as_answered)
        self.client.set_response_callback("XREAD", _as_answered)  # reply streams and inboxes: as Redis answers
        self._commit = self.client.register_script(_COMMIT)
        self.awaited_to_end: Callable[[str], bool] = lambda conversation: False
        """Whether a client waits on this daemon for a conversation's end (the engine's reply watcher knows)."""
        self._commits: Batcher[tuple[bytes, list[bytes], str | None], tuple[int, Committed]] = Batcher(
            self._commit_batch, max_batch=COMMITS_PER_CALL, wait_seconds=3 * socket_timeout
        )
        self._look_script = self.client.register_script(_LOOK)
        self._looks: Batcher[str, tuple[bytes, int]] = Batcher(
            self._look_batch, max_batch=COMMITS_PER_CALL, wait_seconds=3 * socket_timeout
        )
        self._unlinks: Batcher[str, None] = Batcher(
            self._unlink_batch, max_batch=COMMITS_PER_CALL, max_calls=1, wait_seconds=3 * socket_timeout
        )

    async def ensure_groups(self, listeners: Sequence[str]) -> None:
        # The registry's batch script (redis_backend) looks for live conversations' registrations in their
        # hashes only under a prefix that says it holds durable conversations.
        await self.client.set(self.keys.durable_marker, "1")
        for listener in listeners:
            try:
                await self.client.xgroup_create(self.keys.stream(listener), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def commit(
        self,
        conversation: str,
        effects: Effects,
        *,
        done: tuple[str, bytes] | None = None,
        opening: tuple[str, str, int] | None = None,
        owner: str | None = None,
        continues: str = "",
        unless_live: str = "",
        hand_over: bool = False,
    ) -> Committed:
        """Write ``effects`` and finish ``done`` (stream, entry id) in one step; what it wrote for the client.

        ``opening`` (initiator, target, backlog cap) opens the conversation at
        the door, refused with BacklogFull when the target's stream is full.
        With ``continues`` (the thread of the new hop) it adds to the live
        conversation its initiator opened instead, refused with NotLive when
        that conversation is over (or another's: another initiator, or another ``owner``).
        An opening with ``unless_live`` (a conversation id) is refused with
        StillLive when that conversation is live and the same initiator's and
        owner's: the client meant to continue it. With ``hand_over``, if a
        client waits here for the end when the call is made (:attr:`awaited_to_end`),
        a step that ends a conversation opened here,
        which wrote no reply before, stores neither replies nor end: the answer
        says so (``handed``), and the caller gives them to the waiter, or
        stores them after all with :meth:`keep_replies`.
        When ``done`` was no longer pending (someone else finished it),
        nothing was written: the answer is ``NO_REPLIES``. The commits of one loop turn
        go to Redis in one script call (:mod:`.batching`), each still all or
        nothing on its own.
        """
        stream, entry_id = done if done is not None else ("", b"")
        initiator, capped, cap = opening if opening is not None else ("", "", -1)
        ops, blobs = effects.arguments(self.keys, conversation)
        packed = msgpack.packb(
            [
                stream,
                entry_id,
                conversation,
                cap,
                self.keys.stream(capped) if capped else "",
                initiator,
                owner or "",
                continues,
                len(effects.hops),
                len(blobs),
                unless_live,
                *ops,
            ],
            use_bin_type=False,  # Redis's cmsgpack reads the classic raw strings only, not bin
        )
        written, committed = await self._commits.submit((packed, blobs, conversation if hand_over else None))
        if written == -1:
            raise BacklogFull(f"{capped} has {cap} messages waiting already")
        if written == 3:
            raise NotLive(f"conversation {conversation} is over, or not {initiator}'s")
        if written == 4:
            raise StillLive(f"conversation {unless_live} is live and {initiator}'s")
        return committed

    async def _commit_batch(self, batch: list[tuple[bytes, list[bytes], str | None]]) -> list[tuple[int, Committed]]:
        """One script call for ``batch``, each commit packed already (its array, its blobs, and the conversation
        whose end it may hand over): whether a client waits for that end is asked only now, as late as can be."""
        args: list[Any] = [self.keys.prefix, GROUP, self.reply_retention, self.daemon_id]
        awaited = self.awaited_to_end
        for packed, blobs, may_hand_over in batch:
            args += [packed, "1" if may_hand_over is not None and awaited(may_hand_over) else "", *blobs]
        answers: Any = await self._commit(args=args)
        found: list[tuple[int, Committed]] = []
        i = 0
        while i < len(answers):
            written, ended, fresh, count = answers[i : i + 4]
            ids = answers[i + 4 : i + 4 + count]
            if fresh == 2:
                found.append((int(written), Committed(True, [], True, handed=True, owner=_text(ids[0]))))
            else:
                found.append((int(written), Committed(bool(ended), ids, bool(fresh)) if ids else NO_REPLIES))
            i += 4 + count
        return found

    async def read(self, consumer: str, counts: dict[str, int], block_ms: int) -> list[tuple[str, bytes, Hop]]:
        """New hops for the listeners in ``counts``, at most that many each: (listener, entry id, hop)."""
        if not counts:
            return []
        count = max(counts.values())
        streams = {self.keys.stream(listener): ">" for listener in counts}
        answer: Any = await self.client.xreadgroup(GROUP, consumer, streams, count=count, block=block_ms)  # type: ignore[arg-type]
        found: list[tuple[str, bytes, Hop]] = []
        prefix = self.keys.prefix + "s:"
        for stream, entries in _per_stream(answer):
            listener = stream.decode().removeprefix(prefix)
            for entry_id, fields in entries:
                found.append((listener, entry_id, Hop.from_fields(_pairs(fields))))
        return found

    async def pending(self, listener: str, min_idle_ms: int, count: int) -> list[PendingEntry]:
        rows: Any = await self.client.xpending_range(
            self.keys.stream(listener), GROUP, "-", "+", count, idle=min_idle_ms
        )
        return [
            PendingEntry(
                row["message_id"], row["consumer"].decode(), row["time_since_delivered"], row["times_delivered"]
            )
            for row in rows
        ]

    async def claim(self, listener: str, consumer: str, min_idle_ms: int, entry_id: bytes) -> Hop | None:
        """Take over a hop a silent daemon was handling; None if it is gone or was renewed meanwhile."""
        claimed: Any = await self.client.xclaim(self.keys.stream(listener), GROUP, consumer, min_idle_ms, [entry_id])
        for _, fields in claimed:
            if fields:
                return Hop.from_fields(fields)
        return None

    async def forget_consumers(self, listener: str, *, idle_ms: int, keep: str) -> int:
        """Remove consumers of ``listener``'s stream that hold nothing and were idle ``idle_ms``: gone daemons.

        Each daemon that ever started is a consumer of the group; without this,
        a service that restarts for years would list every one of them.
        """
        stream = self.keys.stream(listener)
        consumers: Any = await self.client.xinfo_consumers(stream, GROUP)
        gone = [c["name"] for c in consumers if c["pending"] == 0 and c["idle"] >= idle_ms and _text(c["name"]) != keep]
        for name in gone:
            await self.client.xgroup_delconsumer(stream, GROUP, name)
        return len(gone)

    async def renew(self, listener: str, consumer: str, entry_ids: Sequence[bytes]) -> None:
        """Reset the idle time of hops this daemon is still handling, so nobody claims them."""
        if entry_ids:
            await self.client.xclaim(self.keys.stream(listener), GROUP, consumer, 0, list(entry_ids), justid=True)

    async def replies(self, conversation: str, after: bytes) -> list[tuple[bytes, ClientReply | None]]:
        """Reply entries after ``after`` (without waiting): (id, reply), with None for the end marker."""
        answer: Any = await self.client.xread({self.keys.replies(conversation): after})
        return [item for _, rows in _per_stream(answer) for item in _entries(rows)]

    def dedicated_client(self) -> aioredis.Redis:
        """A client that keeps one connection of the pool, so its CLIENT ID can be unblocked."""
        client = aioredis.Redis(connection_pool=self.client.connection_pool, single_connection_client=True)
        client.set_response_callback("XREAD", _as_answered)  # read as Redis answers, in either protocol
        return client

    async def replies_of(
        self, wanted: dict[str, bytes], block_ms: int, client: aioredis.Redis, inbox_after: bytes | None = None
    ) -> RepliesRead:
        """One blocking read of many reply streams on ``client``: each conversation's entries after its id;
        with ``inbox_after``, this daemon's inbox too: the conversations it was told have news."""
        streams = {self.keys.replies(conversation): after for conversation, after in wanted.items()}
        inbox = self.keys.inbox(self.daemon_id)
        if inbox_after is not None:
            streams[inbox] = inbox_after
        answer: Any = await client.xread(streams, block=block_ms)  # type: ignore[arg-type]
        read = RepliesRead({}, [], inbox_after)
        prefix = self.keys.replies("")
        for stream, rows in _per_stream(answer):
            name = stream.decode()
            if name == inbox:
                notices = (_pairs(fields).get(b"c") for _, fields in rows)
                read.notices.extend(notice.decode() for notice in notices if notice is not None)
                read.inbox_after = rows[-1][0] if rows else inbox_after
            else:
                read.replies[name.removeprefix(prefix)] = _entries(rows)
        return read

    async def open_inbox(self, ttl_seconds: int) -> bytes:
        """This daemon's inbox, made (again) with a TTL the heartbeat renews; the id to read after."""
        inbox = self.keys.inbox(self.daemon_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(inbox, {"opened": "1"}, maxlen=10_000, approximate=True)
            pipe.expire(inbox, ttl_seconds)
            entry_id, _ = await pipe.execute()
        return bytes(entry_id)

    async def look(self, conversation: str) -> tuple[str | None, bool]:
        """Who opened ``conversation`` (their identity, None without a token) and whether it is known at all:
        live, or its replies still kept. Every collect asks, so the questions of one loop turn go as one call.
        """
        owner, known = await self._looks.submit(conversation)
        return (owner.decode() or None), bool(known)

    async def _look_batch(self, conversations: list[str]) -> list[tuple[bytes, int]]:
        answers: Any = await self._look_script(args=[self.keys.prefix, *conversations])
        return [(answers[i], int(answers[i + 1])) for i in range(0, len(answers), 2)]

    async def conversation_known(self, conversation: str) -> bool:
        keys = self.keys
        return bool(await self.client.exists(keys.conversation(conversation), keys.replies(conversation)))

    async def keep_replies(self, conversation: str, replies: Sequence[ClientReply], owner: str) -> Committed:
        """Store the replies and end of a conversation whose ending step handed them to a waiter that was gone by
        then, as that step would have stored them (kept for the reply retention)."""
        key = self.keys.replies(conversation)
        async with self.client.pipeline(transaction=True) as pipe:
            for number, reply in enumerate(replies, 1):
                start, end = reply.payload_span
                fields = {"reply": reply.envelope, "type": reply.payload_type, "at": f"{start}:{end}"}
                if number == len(replies):
                    fields["end"] = "1"
                pipe.xadd(key, fields)  # type: ignore[arg-type]
            if not replies:
                pipe.xadd(key, {"end": "1"})
            pipe.expire(key, self.reply_retention)
            if owner:
                pipe.set(self.keys.reply_owner(conversation), owner, ex=self.reply_retention)
            written: list[Any] = await pipe.execute()
        return Committed(True, [bytes(entry_id) for entry_id in written[: max(1, len(replies))]], True)

    async def forget_replies(self, conversation: str, entry_ids: Sequence[bytes], *, ended: bool) -> None:
        """Collected replies are gone; after the end, the whole stream (with the other ends of this loop turn)."""
        key = self.keys.replies(conversation)
        if ended:
            await self._unlinks.submit(key)
        elif entry_ids:
            await self.client.xdel(key, *entry_ids)

    async def _unlink_batch(self, keys: list[str]) -> list[None]:
        await self.client.unlink(*keys)
        return [None] * len(keys)

    async def heartbeat(self, daemon_id: str, about: dict[str, Any], ttl_seconds: int) -> bool:
        """Say this daemon lives, and keep its inbox; False if the inbox was gone (it missed notices)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.daemon(daemon_id), json.dumps({**about, "seen": time.time()}), ex=ttl_seconds)
            pipe.expire(self.keys.inbox(daemon_id), ttl_seconds)
            _, kept = await pipe.execute()
        return bool(kept)

    async def forget_daemon(self, daemon_id: str) -> None:
        await self.client.unlink(self.keys.daemon(daemon_id), self.keys.inbox(daemon_id))

    async def daemons(self) -> list[dict[str, Any]]:
        found = []
        pattern = glob_under(self.keys.prefix, self.keys.daemon("*"))
        async for key in self.client.scan_iter(match=pattern, count=100):
            value = await self.client.get(key)
            if value is not None:
                found.append(json.loads(value))
        return found

    async def backlog(self, listener: str) -> tuple[int, int]:
        """(hops in the stream, of which being handled) for ``listener``."""
        stream = self.keys.stream(listener)
        length = await self.client.xlen(stream)
        summary: Any = await self.client.xpending(stream, GROUP)
        return int(length), int(summary["pending"]) if summary else 0

    async def dead_letter_count(self) -> int:
        return int(await self.client.xlen(self.keys.dead_letters))

    async def close(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


def _entries(rows: list[Any]) -> list[tuple[bytes, ClientReply | None]]:
    """A reply stream's rows, as Redis answers them, as (id, reply) items (see :func:`_entry`)."""
    return [item for entry_id, fields in rows for item in _entry(entry_id, _pairs(fields))]


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> list[tuple[bytes, ClientReply | None]]:
    """A reply entry as (id, reply) items, with None for the end: its reply, the end, or both, which a step
    that ends its conversation writes as one entry."""
    items: list[tuple[bytes, ClientReply | None]] = []
    envelope = fields.get(b"reply")
    if envelope is not None:
        start, _, end = fields[b"at"].partition(b":")
        items.append((entry_id, ClientReply(envelope, fields[b"type"].decode(), envelope[int(start) : int(end)])))
    if b"end" in fields:
        items.append((entry_id, None))
    return items


def _as_answered(response: Any, **options: Any) -> Any:
    return response


def _pairs(fields: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields as Redis answers them (name, value, ...), as a dict."""
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _per_stream(answer: Any) -> Any:
    """A stream read's answer as (stream, entries) pairs: a map in RESP3, a list of pairs in RESP2."""
    if not answer:
        return ()
    return answer.items() if isinstance(answer, dict) else answer


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
