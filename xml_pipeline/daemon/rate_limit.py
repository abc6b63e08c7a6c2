"""Requests per client per second: a token bucket for each client, refused with 429 when empty.

Each client has a bucket of ``burst`` requests that refills at ``rate`` per
second; a request takes one. An empty bucket answers ``429`` with the seconds
until the next one is due (``Retry-After``), so a well-behaved client knows
when to come back and a flood costs the daemon a dictionary lookup per request.

A client is its token's identity; without a token, the address it connects
from (on TCP, which is loopback-only without tokens) or the Unix socket as a
whole, since the socket's users are trusted by its file permissions alike.
Buckets that have filled up again are dropped by :meth:`RateLimiter.sweep`:
a full bucket and no bucket behave the same, so memory follows recent clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str) -> float:
        """Take one request from ``client``'s bucket: 0 when allowed, else the seconds until one is due."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def sweep(self) -> None:
        """Forget the buckets that are full again."""
        now = self._clock()
        full = [
            client
            for client, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * self.rate >= self.burst
        ]
        for client in full:
            del self._buckets[client]

    def __len__(self) -> int:
        return len(self._buckets)
