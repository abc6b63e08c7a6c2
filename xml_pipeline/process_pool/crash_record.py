"""Payloads that crashed worker processes, so that one which crashes every time is refused.

A worker crash costs more than the call that caused it: the executor breaks,
every other call in it is run again, and new workers are spawned. A caller
retrying a payload that always kills its worker (``worker-crash`` allows a
retry) would keep the pool in that state. So the pool counts, per payload (the
same handler and the same payload XML), the crashes in a row, and refuses the
payload once it has crashed MAX_CRASHES workers. A payload that completes
normally is forgotten. The record is bounded: the least recently crashed
payloads are forgotten first.

"The same payload XML" means the same XML, not the same bytes: a caller must
not get a crash-looping payload past the refusal by re-spacing it, adding a
comment or declaring a namespace it does not use. So the payload is keyed on
its exclusive C14N form without comments, parsed with whitespace-only text
between elements dropped (the payload contracts have element-only content, so
that whitespace never reaches a handler; the text of a field is kept as is).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from lxml import etree

from xml_pipeline.process_pool.worker import Task

MAX_CRASHES = 3
"""Crashes in a row after which a payload is refused without running."""

REMEMBERED_PAYLOADS = 1024
"""How many crashing payloads the record keeps, most recent first."""


_CANONICAL_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, remove_comments=True, remove_blank_text=True
)


def _canonical(payload_xml: bytes) -> bytes:
    """The payload as exclusive C14N without comments or blank text between elements: equal for equivalent XML.

    The bytes are the pump's own serialization of a payload it already parsed
    and checked, so they parse; should they not, they stand for themselves.
    """
    try:
        root = etree.fromstring(payload_xml, _CANONICAL_PARSER)
    except etree.XMLSyntaxError:
        return payload_xml
    return etree.tostring(root, method="c14n", exclusive=True, with_comments=False)


def _fingerprint(task: Task) -> bytes:
    digest = hashlib.sha256()
    for part in (task.handler_path.encode(), task.payload_type.encode(), _canonical(task.payload_xml)):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


class CrashRecord:
    def __init__(self, *, max_crashes: int = MAX_CRASHES, remembered: int = REMEMBERED_PAYLOADS) -> None:
        self.max_crashes = max_crashes
        self._remembered = remembered
        self._crashes: OrderedDict[bytes, int] = OrderedDict()

    def refuses(self, task: Task) -> bool:
        return self.crashes(task) >= self.max_crashes

    def crashes(self, task: Task) -> int:
        if not self._crashes:  # the usual case, asked before every call: no payload need be canonicalized
            return 0
        return self._crashes.get(_fingerprint(task), 0)

    def count_crash(self, task: Task) -> int:
        """Note that ``task`` was running in a worker that died; return its crashes in a row."""
        key = _fingerprint(task)
        crashes = self._crashes.pop(key, 0) + 1
        self._crashes[key] = crashes
        while len(self._crashes) > self._remembered:
            self._crashes.popitem(last=False)
        return crashes

    def forget(self, task: Task) -> None:
        """``task`` completed in a worker: whatever crashed before was not the payload alone."""
        if self._crashes:
            self._crashes.pop(_fingerprint(task), None)
