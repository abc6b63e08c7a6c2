"""A hop as a stream entry: everything a daemon needs to handle it, with no lookup.

The call chain and the thread of each of its prefixes travel with the hop, so
any daemon can route a response back to the caller (prune the chain) without
asking Redis which thread a chain had. Listener names never contain ``/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

_SEP = "/"


@dataclass(frozen=True, slots=True)
class Hop:
    conversation: str
    chain: tuple[str, ...]
    """Who called whom, the client first and the hop's target last."""
    threads: tuple[str, ...]
    """The thread of each prefix of ``chain``: ``threads[0]`` is the conversation's own (the client's)."""
    sender: str
    payload_type: str
    payload_xml: bytes
    trace: str = ""
    """The hop's reference for whoever observes (:mod:`xml_pipeline.observe`), so any daemon continues its trace."""
    decoded: Any = field(default=None, compare=False, repr=False)
    """The payload as the daemon that made this hop decoded it; never stored (see :mod:`.decoded`)."""

    FIELD_NAMES: ClassVar[tuple[str, ...]] = ("conv", "chain", "threads", "from", "type", "payload", "trace")
    """The names of :meth:`fields`, in order."""

    @property
    def thread(self) -> str:
        return self.threads[-1]

    @property
    def target(self) -> str:
        return self.chain[-1]

    @property
    def initiator(self) -> str:
        return self.chain[0]

    def fields(self) -> list[bytes | str]:
        """Flat field/value pairs for XADD."""
        return [
            "conv", self.conversation,
            "chain", _SEP.join(self.chain),
            "threads", _SEP.join(self.threads),
            "from", self.sender,
            "type", self.payload_type,
            "payload", self.payload_xml,
            "trace", self.trace,
        ]  # fmt: skip

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Hop:
        return cls(
            conversation=fields[b"conv"].decode(),
            chain=tuple(fields[b"chain"].decode().split(_SEP)),
            threads=tuple(fields[b"threads"].decode().split(_SEP)),
            sender=fields[b"from"].decode(),
            payload_type=fields[b"type"].decode(),
            payload_xml=fields[b"payload"],
            trace=fields.get(b"trace", b"").decode(),
        )
