"""Opaque thread UUIDs <-> call chains.

A handler only ever sees a UUID; the registry knows which call chain it stands
for (``console -> router -> greeter``). Forwarding extends the chain, responding
prunes the last segment and routes to the new last one.

Chains are kept as tuples of names, never as dotted strings, so listener names
that contain dots (``system.buffer``) stay unambiguous. Every chain belongs to
a *conversation*, named by the UUID of its root thread: two conversations that
take the same path get different UUIDs, different history and different
replies. The key a backend stores is ``<conversation>/<name>/<name>...``; ``/``
cannot occur in a listener name.

Two faces, one store:

- The pump's own API is conversation-scoped and tuple-based
  (:meth:`ThreadRegistry.start_conversation`, ``get_or_create(chain,
  conversation)``, :meth:`ThreadRegistry.lookup_record`); the pump itself
  routes from its own index and writes here for handlers, workers and
  operators to read.
- The reference design's dotted API (``get_or_create("a.b")``,
  ``start_chain``, ``register_thread``, ``prune_for_response`` giving
  ``(caller, uuid)``) works in one shared namespace, the conversation with the
  empty name, so the same dotted chain always gives the same UUID, as it did
  there.

**Names with dots in the dotted API.** A dotted string is split at every dot:
``get_or_create("console.system.buffer")`` is the three-segment chain
``console``, ``system``, ``buffer``. Names handed over one at a time stay one
segment whatever they contain: ``start_chain("console", "system.buffer")``,
``extend_chain(uuid, "team.alpha")`` and ``register_thread`` keep them whole,
and ``prune_for_response`` on such a chain answers ``system.buffer``, not
``buffer``. To name such a chain at once, pass a tuple:
``get_or_create(("console", "system.buffer"))``. ``lookup`` and
``debug_dump`` join segments with dots for people to read, so their output
cannot tell the two apart; :meth:`ThreadRegistry.lookup_record` gives the
segments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.process_wide import ProcessWide

_SEP = "/"
SHARED_NAMESPACE = ""
"""The conversation of the dotted API's chains: one namespace for all of them, as in the reference."""
ROOT_SEGMENT = "system"


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    conversation: str
    chain: tuple[str, ...]

    @property
    def display(self) -> str:
        return ".".join(self.chain)


class Pruned(NamedTuple):
    """Where a response goes: to ``target`` (the caller) on thread ``thread_id``."""

    target: str
    thread_id: str


NO_CALLER: tuple[None, None] = (None, None)
"""What ``prune_for_response`` gives when there is no one to respond to."""


class NewConversation(NamedTuple):
    """A conversation just started: its root thread, and the thread its first target is called on."""

    conversation: str
    thread: str


_RANDOM_HEX_CHUNK = 4096
"""Random hex digits read at once: one system call for 128 thread ids instead of one each."""
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
"""The RFC 4122 variant's digit for a random one: its two high bits set to 10, the low two kept."""


class _RandomHex:
    """Cryptographically random hex digits (``os.urandom``), read ahead in chunks and handed out once each."""

    def __init__(self) -> None:
        self.digits = ""
        self.at = 0

    def forget(self) -> None:
        """Drop what was read ahead (in a forked child, which must not hand out its parent's ids)."""
        self.digits, self.at = "", 0

    def take(self, count: int) -> str:
        at = self.at
        if at + count > len(self.digits):
            self.digits, at = os.urandom(_RANDOM_HEX_CHUNK // 2).hex(), 0
        self.at = at + count
        return self.digits[at : at + count]


_random_hex = _RandomHex()
os.register_at_fork(after_in_child=_random_hex.forget)


def new_thread_id() -> str:
    """A random (version 4) UUID, formatted directly: every conversation needs two."""
    text = _random_hex.take(32)
    return f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{_VARIANT[text[16]]}{text[17:20]}-{text[20:]}"


def chain_key(conversation: str, chain: Sequence[str]) -> str:
    """The key a backend stores for ``chain`` within ``conversation``."""
    return conversation + _SEP + _SEP.join(chain)


def _parse_key(key: str) -> ThreadRecord:
    """A stored key as conversation and segments; a dotted key without ``/`` is the reference's own.

    Code written against the reference calls ``backend.registry_set("a.b", uuid)``
    directly; such a chain belongs to the shared namespace, split at its dots.
    """
    if _SEP not in key:
        return ThreadRecord(SHARED_NAMESPACE, tuple(key.split(".")))
    conversation, *chain = key.split(_SEP)
    return ThreadRecord(conversation, tuple(chain))


def _as_chain(chain: str | Sequence[str]) -> tuple[str, ...]:
    segments = tuple(chain.split(".")) if isinstance(chain, str) else tuple(chain)
    if not segments or any(not segment or _SEP in segment for segment in segments):
        raise ValueError(f"not a valid chain: {chain!r}")
    return segments


class ThreadRegistry:
    def __init__(self, backend: SharedBackend | None = None) -> None:
        self._given_backend = backend is not None
        self.backend: SharedBackend = backend if backend is not None else InMemoryBackend()
        self._root_chain: tuple[str, ...] = (ROOT_SEGMENT,)
        self._root_uuid: str | None = None

    @property
    def is_shared(self) -> bool:
        """True when this registry was given a backend (its state may then be seen elsewhere)."""
        return self._given_backend

    # --- the organism's root thread ---
    def initialize_root(self, organism_name: str = "organism") -> str:
        """The UUID of the root chain ``system.<organism_name>``, made on the first call.

        Idempotent: later calls return the same UUID. Registries sharing a
        backend find the same root.
        """
        if self._root_uuid is None:
            chain = (ROOT_SEGMENT, organism_name)
            self._root_uuid = self._claim(SHARED_NAMESPACE, _as_chain(chain))
            self._root_chain = chain
        return self._root_uuid

    @property
    def root_uuid(self) -> str | None:
        return self._root_uuid

    @property
    def root_chain(self) -> str:
        """``system`` before :meth:`initialize_root`, ``system.<organism name>`` after."""
        return ".".join(self._root_chain)

    # --- chains ---
    def get_or_create(self, chain: str | Sequence[str], conversation: str | None = None) -> str:
        """The UUID of ``chain``: the same chain always gives the same UUID.

        ``chain`` is dotted (split at every dot) or a sequence of names. Without
        ``conversation`` it lives in the dotted API's shared namespace.
        """
        return self._claim(SHARED_NAMESPACE if conversation is None else conversation, _as_chain(chain))

    def start_chain(self, initiator: str, target: str) -> str:
        """The UUID of the chain ``initiator.target`` (each name one segment)."""
        return self._claim(SHARED_NAMESPACE, _as_chain((initiator, target)))

    def start_conversation(self, initiator: str, target: str) -> NewConversation:
        """Start a new conversation ``initiator -> target``, with threads no other conversation shares."""
        conversation = new_thread_id()
        self.backend.registry_set(chain_key(conversation, _as_chain((initiator,))), conversation)
        return NewConversation(conversation, self._claim(conversation, _as_chain((initiator, target))))

    def register_thread(self, thread_id: str, initiator: str, target: str) -> str:
        """Bind a UUID from outside to ``<root_chain>.initiator.target`` (``initiator.target`` without a root).

        Returns the UUID the chain has: ``thread_id``, or the one the chain
        already had. A UUID registered before keeps its chain.
        """
        if self.backend.registry_get_chain(thread_id) is not None:
            return thread_id
        root = self._root_chain if self._root_uuid is not None else ()
        key = chain_key(SHARED_NAMESPACE, _as_chain((*root, initiator, target)))
        return self.backend.registry_get_or_set(key, thread_id)

    def _claim(self, conversation: str, chain: tuple[str, ...]) -> str:
        key = chain_key(conversation, chain)
        existing = self.backend.registry_get_uuid(key)
        if existing is not None:
            return existing
        return self.backend.registry_get_or_set(key, new_thread_id())

    def lookup_record(self, thread_id: str) -> ThreadRecord | None:
        """The conversation and the exact segments of a UUID's chain."""
        key = self.backend.registry_get_chain(thread_id)
        return None if key is None else _parse_key(key)

    def lookup(self, thread_id: str) -> str | None:
        """The dotted chain a UUID stands for, for people to read."""
        record = self.lookup_record(thread_id)
        return None if record is None else record.display

    def extend_chain(self, thread_id: str, next_hop: str) -> str:
        """The UUID of ``thread_id``'s chain with ``next_hop`` appended (one segment); KeyError if unknown."""
        record = self.lookup_record(thread_id)
        if record is None:
            raise KeyError(f"unknown thread {thread_id}")
        return self._claim(record.conversation, (*record.chain, *_as_chain((next_hop,))))

    def prune_for_response(self, thread_id: str) -> Pruned | tuple[None, None]:
        """Where the head of ``thread_id``'s chain sends its response: ``(caller, caller's thread)``.

        ``(None, None)`` for an unknown UUID, and for a one-segment chain, which
        has no one to respond to and is cleaned up.
        """
        record = self.lookup_record(thread_id)
        if record is None:
            return NO_CALLER
        if len(record.chain) < 2:
            self.cleanup(thread_id)
            return NO_CALLER
        parent = record.chain[:-1]
        return Pruned(target=parent[-1], thread_id=self._claim(record.conversation, parent))

    # --- cleanup ---
    def cleanup(self, thread_id: str) -> bool:
        """Forget a UUID and its chain; True if it was registered."""
        return self.backend.registry_delete(thread_id)

    def cleanup_many(self, thread_ids: Sequence[str] | set[str]) -> int:
        return sum(1 for thread_id in thread_ids if self.backend.registry_delete(thread_id))

    def debug_dump(self) -> dict[str, str]:
        """Every thread, UUID -> dotted chain."""
        return {uuid: _parse_key(key).display for uuid, key in self.backend.registry_list_all().items()}

    def __len__(self) -> int:
        return len(self.backend.registry_list_all())

    def clear(self) -> None:
        """Forget every thread in the backend, and the root."""
        self.backend.registry_clear()
        self._root_chain = (ROOT_SEGMENT,)
        self._root_uuid = None


_current: ProcessWide[ThreadRegistry] = ProcessWide(ThreadRegistry)


def get_registry(backend: SharedBackend | None = None) -> ThreadRegistry:
    """The process-wide registry (the running pump installs its own as this one).

    ``backend`` is used only when this call makes the registry; once one
    exists it is returned as it is.
    """
    return _current.get(lambda: ThreadRegistry(backend))


set_registry = _current.set


def reset_registry() -> None:
    """Forget the process-wide registry (tests); its threads stay in its backend."""
    _current.reset()
