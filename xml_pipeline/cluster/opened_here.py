"""The conversations this daemon opened lately, and for whom: so collecting their replies asks Redis nothing.

Every collect must know whether the conversation exists and who opened it
(only its owner may read its replies). For the usual client, which sends
through a daemon and waits on the same one, that daemon stored the
conversation itself moments ago and knows both; asking Redis again cost a
script call per conversation. What it remembers is bounded in number and in
age (no longer than the reply retention, past which Redis may have let the
replies expire), and forgotten once it has seen the conversation's end here.
A conversation whose end another daemon collected meanwhile still reads as
known here: a wait for it runs to its timeout and then answers unknown, as a
look would have answered at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import NamedTuple

REMEMBERED = 65_536
"""Conversations remembered at most; the oldest make room (a forgotten one is looked up in Redis)."""


class Opened(NamedTuple):
    owner: str | None
    """The identity of the client that opened it, None without a token."""


class OpenedHere:
    def __init__(self, retention_seconds: float, *, limit: int = REMEMBERED) -> None:
        self._retention = retention_seconds
        self._limit = limit
        self._owners: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    def note(self, conversation: str, owner: str | None) -> None:
        """``conversation`` is stored, opened by ``owner`` (an identity, or None without a token)."""
        self._owners[conversation] = (owner, time.monotonic())
        self._owners.move_to_end(conversation)
        while len(self._owners) > self._limit:
            self._owners.popitem(last=False)

    def recall(self, conversation: str) -> Opened | None:
        """Who opened ``conversation``, when this daemon knows it exists; else None (ask Redis)."""
        found = self._owners.get(conversation)
        if found is None:
            return None
        owner, noted = found
        if time.monotonic() - noted > self._retention:
            del self._owners[conversation]
            return None
        return Opened(owner)

    def forget(self, conversation: str) -> None:
        """Its end was collected here: its replies are gone from Redis."""
        self._owners.pop(conversation, None)

    def __len__(self) -> int:
        return len(self._owners)
