"""The organism as the pump runs it: listeners with compiled contracts, and limits.

organism.yaml is one way to build it (``xml_pipeline.config.loader``); tests
and embedding programs build it in code.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xml_pipeline.handler import Handler
from xml_pipeline.message.envelope import LISTENER_NAME
from xml_pipeline.message.payload_codec import PayloadCodec, codec_for
from xml_pipeline.message.safe_xml import XmlLimits
from xml_pipeline.message.system_payloads import SystemErrorPayload
from xml_pipeline.message_bus.slots import Slots

RESERVED_PREFIX = "system"
"""``system`` and ``system.*`` belong to the pump and its built-in listeners."""


def is_reserved(name: str) -> bool:
    return name == RESERVED_PREFIX or name.startswith(RESERVED_PREFIX + ".")


class Listener:
    """One node of the organism: its contract, its handler, its limits.

    ``peers=None`` means the listener may forward to anyone; an empty set means
    it may only respond to its caller. ``ingress=True`` lets clients call it
    (see ``xml_pipeline.message_bus.client_access``); built-in listeners never are.
    """

    def __init__(
        self,
        name: str,
        payload_classes: Iterable[type],
        handler: Handler,
        *,
        description: str = "",
        peers: Iterable[str] | None = None,
        agent: bool = False,
        ingress: bool = False,
        cpu_bound: bool = False,
        timeout_seconds: float = 30.0,
        max_concurrency: int = 16,
        system: bool = False,
        accepts_any: bool = False,
        coordinator: bool = False,
        eager: bool = False,
    ) -> None:
        if not LISTENER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid listener name")
        if is_reserved(name) and not system:
            raise ValueError(f"{name!r}: names starting with 'system' are reserved")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"listener {name!r}: handler must be an async function")
        if timeout_seconds <= 0 or max_concurrency < 1:
            raise ValueError(f"listener {name!r}: timeout and concurrency must be positive")
        self.name = name
        self.handler = handler
        self.description = description
        self.peers = frozenset(peers) if peers is not None else None
        self.agent = agent
        self.ingress = ingress
        self.cpu_bound = cpu_bound
        self.timeout_seconds = timeout_seconds
        self.max_concurrency = max_concurrency
        self.accepts_any = accepts_any
        """Takes any payload dataclass from other listeners (collectors of answers)."""
        self.coordinator = coordinator
        """Waits on other listeners' work, so it holds no global in-flight slot while it runs."""
        self.eager = eager
        """Its handler returns without awaiting (the pump's own collectors of answers): the dispatcher runs it
        in its own turn, without a task or a deadline (:mod:`xml_pipeline.message_bus.eager`)."""
        self.codecs_by_tag: dict[str, PayloadCodec[Any]] = {}
        self.codecs_by_class: dict[type, PayloadCodec[Any]] = {}
        for cls in payload_classes:
            codec: PayloadCodec[Any] = codec_for(cls)
            if codec.tag in self.codecs_by_tag and self.codecs_by_tag[codec.tag].cls is not cls:
                raise ValueError(f"listener {name!r}: two payload classes map to <{codec.xml_name}>")
            self.codecs_by_tag[codec.tag] = codec
            self.codecs_by_class[cls] = codec
        if not self.codecs_by_tag:
            raise ValueError(f"listener {name!r} accepts no payload class")
        self.accepts_errors = SystemErrorPayload in self.codecs_by_class
        self._slots: Slots | None = None
        if cpu_bound:
            for qualname in (handler.__qualname__, *(cls.__qualname__ for cls in self.codecs_by_class)):
                if "<locals>" in qualname:
                    raise ValueError(
                        f"listener {name!r}: cpu_bound handlers and payload classes must be defined at module"
                        f" level, so worker processes can import them ({qualname} is not)"
                    )

    @property
    def handler_path(self) -> str:
        """Where a worker process imports the handler from."""
        return f"{self.handler.__module__}:{self.handler.__qualname__}"

    @property
    def slots(self) -> Slots:
        """Per-listener concurrency limit, created lazily inside the running loop."""
        if self._slots is None:
            self._slots = Slots(self.max_concurrency)
        return self._slots

    def may_call(self, target: str) -> bool:
        return self.peers is None or target in self.peers

    @property
    def accepted_names(self) -> str:
        return ", ".join(sorted(codec.xml_name for codec in self.codecs_by_tag.values()))

    def __repr__(self) -> str:
        return f"Listener({self.name!r})"


@dataclass(frozen=True, slots=True)
class PumpLimits:
    """Bounds that keep one daemon's memory and latency predictable."""

    queue_size: int = 1024
    max_in_flight: int = 256
    max_message_bytes: int = 1024 * 1024
    max_depth: int = 64
    repair: bool = False
    enqueue_timeout_seconds: float = 30.0
    mailbox_size: int = 100
    max_slots_per_thread: int = 10_000
    max_conversations: int = 100_000
    max_reply_bytes: int = 64 * 1024 * 1024
    """Bytes of replies waiting for HTTP clients to collect them, at most; past it new messages get overload."""

    def __post_init__(self) -> None:
        for name in ("queue_size", "max_in_flight", "mailbox_size", "max_slots_per_thread", "max_conversations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.enqueue_timeout_seconds <= 0:
            raise ValueError("enqueue_timeout_seconds must be positive")
        self.xml_limits()  # validates max_message_bytes and max_depth

    def xml_limits(self) -> XmlLimits:
        return XmlLimits(max_bytes=self.max_message_bytes, max_depth=self.max_depth, repair=self.repair)


def register_generic(table: dict[str, Listener], listener: Listener) -> Listener:
    """Add a listener made while running (the primitives', collectors of replies) to an engine's ``table``."""
    if listener.name in table:
        raise ValueError(f"a listener named {listener.name!r} exists already")
    table[listener.name] = listener
    return listener


@dataclass(slots=True)
class Organism:
    name: str
    listeners: dict[str, Listener]
    limits: PumpLimits = field(default_factory=PumpLimits)
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Everything else organism.yaml said (listen addresses, backend, logging)."""

    @classmethod
    def of(cls, name: str, listeners: Iterable[Listener], limits: PumpLimits | None = None) -> Organism:
        table: dict[str, Listener] = {}
        for listener in listeners:
            if listener.name in table:
                raise ValueError(f"two listeners are named {listener.name!r}")
            table[listener.name] = listener
        for listener in table.values():
            for peer in listener.peers or ():
                if peer not in table and not is_reserved(peer):
                    raise ValueError(f"listener {listener.name!r}: peer {peer!r} does not exist")
        return cls(name=name, listeners=table, limits=limits or PumpLimits())
