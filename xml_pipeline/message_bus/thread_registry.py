"""Opaque thread UUIDs <-> call chains.

A handler only ever sees a UUID; the registry knows which call chain it stands
for (``console -> router -> greeter``). Forwarding extends the chain, responding
prunes the last segment and routes to the new last one.

Chains are kept as tuples of names, never as dotted strings, so listener names
that contain dots (``system.buffer``) stay unambiguous. Every chain also belongs
to a *conversation*, named by the UUID of its root thread: two conversations
that take the same path get different UUIDs, different history and different
replies. The key a backend stores is ``<conversation>/<name>/<name>...``; ``/``
cannot occur in a listener name.

The dotted form (``console.router.greeter``) appears only where people read it:
``lookup``, ``debug_dump``, ``root_chain``, and as an accepted input to
``get_or_create`` for names without dots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from xml_pipeline.memory.memory_backend import InMemoryBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.process_wide import ProcessWide

_SEP = "/"


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    conversation: str
    chain: tuple[str, ...]

    @property
    def display(self) -> str:
        return ".".join(self.chain)


@dataclass(frozen=True, slots=True)
class Pruned:
    """Where a response goes: to ``target`` on thread ``thread_id``."""

    target: str
    thread_id: str


def new_thread_id() -> str:
    """A random (version 4) UUID, formatted directly: every conversation needs two."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def chain_key(conversation: str, chain: Sequence[str]) -> str:
    """The key a backend stores for ``chain`` within ``conversation``."""
    return conversation + _SEP + _SEP.join(chain)


def _parse_key(key: str) -> ThreadRecord:
    conversation, *chain = key.split(_SEP)
    return ThreadRecord(conversation, tuple(chain))


def _as_chain(chain: str | Sequence[str]) -> tuple[str, ...]:
    segments = tuple(chain.split(".")) if isinstance(chain, str) else tuple(chain)
    if not segments or any(not segment or _SEP in segment for segment in segments):
        raise ValueError(f"not a valid chain: {chain!r}")
    return segments


class ThreadRegistry:
    def __init__(self, backend: SharedBackend | None = None) -> None:
        self.backend: SharedBackend = backend if backend is not None else InMemoryBackend()
        self._root: ThreadRecord | None = None
        self._root_uuid: str | None = None

    # --- the organism's own conversation, for messages no client started ---
    def initialize_root(self, organism_name: str) -> str:
        """Create (or find) the organism's root thread, ``system.<organism_name>``."""
        chain = ("system", organism_name)
        existing = self._root_uuid
        if existing is not None and self._root is not None and self._root.chain == chain:
            return existing
        candidate = new_thread_id()
        root_uuid = self.backend.registry_get_or_set(chain_key(candidate, chain), candidate)
        self._root = ThreadRecord(root_uuid, chain)
        self._root_uuid = root_uuid
        return root_uuid

    @property
    def root_uuid(self) -> str | None:
        return self._root_uuid

    @property
    def root_chain(self) -> str | None:
        return self._root.display if self._root is not None else None

    @property
    def is_shared(self) -> bool:
        return self.backend.is_shared

    # --- conversations ---
    def start_chain(self, initiator: str, target: str) -> tuple[str, str]:
        """Start a new conversation ``initiator -> target``.

        Returns ``(conversation, thread)``: the root thread (where replies to the
        initiator arrive) and the thread the target is called on.
        """
        conversation = new_thread_id()
        self.backend.registry_set(chain_key(conversation, (initiator,)), conversation)
        return conversation, self._claim(conversation, (initiator, target))

    def get_or_create(self, chain: str | Sequence[str], conversation: str | None = None) -> str:
        """The UUID of ``chain`` within ``conversation`` (the organism root if None)."""
        segments = _as_chain(chain)
        if conversation is None:
            if self._root_uuid is None:
                raise RuntimeError("initialize_root() first, or name the conversation")
            conversation = self._root_uuid
        return self._claim(conversation, segments)

    def _claim(self, conversation: str, chain: tuple[str, ...]) -> str:
        key = chain_key(conversation, chain)
        existing = self.backend.registry_get_uuid(key)
        if existing is not None:
            return existing
        return self.backend.registry_get_or_set(key, new_thread_id())

    def register_thread(self, thread_id: str, chain: str | Sequence[str], conversation: str | None = None) -> None:
        """Bind a known UUID to ``chain``, e.g. one handed over by another organism."""
        segments = _as_chain(chain)
        self.backend.registry_set(chain_key(conversation or thread_id, segments), thread_id)

    def lookup_record(self, thread_id: str) -> ThreadRecord | None:
        key = self.backend.registry_get_chain(thread_id)
        return None if key is None else _parse_key(key)

    def lookup(self, thread_id: str) -> str | None:
        """The dotted chain a UUID stands for, for people to read."""
        record = self.lookup_record(thread_id)
        return None if record is None else record.display

    def extend_chain(self, thread_id: str, next_name: str) -> str:
        """The thread on which the head of ``thread_id``'s chain calls ``next_name``."""
        record = self.lookup_record(thread_id)
        if record is None:
            raise KeyError(f"unknown thread {thread_id}")
        return self._claim(record.conversation, (*record.chain, next_name))

    def prune_for_response(self, thread_id: str) -> Pruned | None:
        """Where the head of ``thread_id``'s chain sends its response; None at the root."""
        record = self.lookup_record(thread_id)
        if record is None or len(record.chain) < 2:
            return None
        parent = record.chain[:-1]
        parent_thread = self.backend.registry_get_uuid(chain_key(record.conversation, parent))
        if parent_thread is None:  # the conversation was cleaned up under us
            return None
        return Pruned(target=parent[-1], thread_id=parent_thread)

    # --- cleanup ---
    def cleanup(self, thread_id: str) -> bool:
        return self.backend.registry_delete(thread_id)

    def cleanup_many(self, thread_ids: Sequence[str] | set[str]) -> int:
        return sum(1 for thread_id in thread_ids if self.backend.registry_delete(thread_id))

    def debug_dump(self) -> dict[str, str]:
        """Every thread, UUID -> dotted chain."""
        return {uuid: _parse_key(key).display for uuid, key in self.backend.registry_list_all().items()}

    def __len__(self) -> int:
        return len(self.backend.registry_list_all())

    def clear(self) -> None:
        self.backend.registry_clear()
        self._root = None
        self._root_uuid = None


_current: ProcessWide[ThreadRegistry] = ProcessWide(ThreadRegistry)
get_registry = _current.get
"""The process-wide registry (the running pump installs its own as this one)."""
set_registry = _current.set
reset_registry = _current.reset
