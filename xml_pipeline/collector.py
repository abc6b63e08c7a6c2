"""The garbage collector of a serving process, set for how a daemon allocates.

CPython's cyclic collector runs a young collection whenever allocations
outnumber frees by 700, and now and then a full one over every tracked object.
A pump frees what it made for a message, by reference counting, once the
message is done, so those collections find nothing to free; but with hundreds
of messages in flight the count crosses 700 every few hops. The durable engine
spent about a tenth of its CPU there (20 µs a hop, measured: docs/benchmarks.md,
measurement 11), a few of them full collections over the ~60,000 objects its
imports and organism leave alive. So a daemon, once it is loaded, collects,
freezes what is alive then (modules, schemas and the organism live as long as
the process, and are not walked again), and lets a young collection wait for
10,000 net allocations. Cyclic garbage (a handler's exception kept with its
traceback, say) is still collected, a little later.

Process-wide: only a process that is a daemon calls it, and the benchmarks,
which measure what a daemon runs. A program that embeds the pump keeps its own
collector settings.
"""

from __future__ import annotations

import gc

YOUNG_COLLECTION_EVERY = 10_000
"""Net allocations between young collections (CPython's default: 700)."""
OLDER_COLLECTION_EVERY = 20
"""Collections of one generation between collections of the next (CPython's default: 10)."""


def settle_for_serving() -> None:
    """Collect, freeze what is alive now, and space collections out (call once the daemon is loaded)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_EVERY, OLDER_COLLECTION_EVERY, OLDER_COLLECTION_EVERY)
