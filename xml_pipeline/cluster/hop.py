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

    FIELD_NAMES: ClassVar[tuple[str, ...]] = ("h", "payload")
    """The names of :meth:`fields`, in order: everything but the payload in one field, ``h``, because each
    field of an entry costs Redis work on every write and read (the names below in order, one per line).
    The durable commit script (:mod:`.store`) writes a hop's entry with these two names."""

    HEADER_NAMES: ClassVar[tuple[str, ...]] = ("conv", "chain", "threads", "from", "type", "trace")
    """What ``h`` holds, a line each (no name, chain, thread, type or trace reference contains a newline),
    and the fields of an entry written before ``h`` (one each), which are still read. A seventh line, when
    there is one, says where the payload starts in the ``payload`` field (see :meth:`header`)."""

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
        return ["h", self.header(), "payload", self.payload_xml]

    def header(self, payload_at: int = 0) -> str:
        """The ``h`` field's value. With ``payload_at``, it says that the ``payload`` field holds that many
        bytes before the payload: the commit script stores the hop's history slot there (one blob, which
        Redis then stores for both), whose head comes first."""
        lines = [
            self.conversation,
            _SEP.join(self.chain),
            _SEP.join(self.threads),
            self.sender,
            self.payload_type,
            self.trace,
        ]
        if payload_at:
            lines.append(str(payload_at))
        return "\n".join(lines)

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Hop:
        header = fields.get(b"h")
        payload = fields[b"payload"]
        if header is None:  # written by a daemon of an earlier version: still in a stream or the dead letters
            conversation, chain, threads, sender, payload_type = (
                fields[name.encode()].decode() for name in cls.HEADER_NAMES[:-1]
            )
            trace = fields.get(b"trace", b"").decode()
        else:
            conversation, chain, threads, sender, payload_type, trace, *at = header.decode().split("\n")
            if at:
                payload = payload[int(at[0]) :]
        return cls(
            conversation=conversation,
            chain=tuple(chain.split(_SEP)),
            threads=tuple(threads.split(_SEP)),
            sender=sender,
            payload_type=payload_type,
            payload_xml=payload,
            trace=trace,
        )
