"""Built-in orchestration listeners: system.sequence (A -> B -> C) and system.buffer (fan-out, fan-in)."""

from __future__ import annotations

from xml_pipeline.message_bus.buffer_registry import BufferRegistry, set_buffer_registry
from xml_pipeline.message_bus.sequence_registry import SequenceRegistry, set_sequence_registry
from xml_pipeline.primitives.buffer import buffer_handler
from xml_pipeline.primitives.host import PrimitiveHost
from xml_pipeline.primitives.payloads import (
    MAX_DEADLINE_SECONDS,
    BufferComplete,
    BufferDispatched,
    BufferError,
    BufferItem,
    BufferStart,
    SequenceComplete,
    SequenceError,
    SequenceStart,
)
from xml_pipeline.primitives.sequence import sequence_handler

__all__ = [
    "BufferComplete",
    "BufferDispatched",
    "BufferError",
    "BufferItem",
    "BufferStart",
    "SequenceComplete",
    "SequenceError",
    "SequenceStart",
    "install_primitives",
]

COORDINATOR_CONCURRENCY = 1000


def install_primitives(pump: PrimitiveHost) -> None:
    """Register system.sequence and system.buffer on ``pump``, with registries on its backend."""
    backend = pump.buffer.backend
    sequences, buffers = SequenceRegistry(backend), BufferRegistry(backend)
    set_sequence_registry(sequences)
    set_buffer_registry(buffers)
    for name, handler, payload_class, description in (
        ("system.sequence", sequence_handler(pump, sequences), SequenceStart, "A -> B -> C"),
        ("system.buffer", buffer_handler(pump, buffers), BufferStart, "fan-out, fan-in"),
    ):
        pump.register_generic_listener(
            name,
            handler,
            [payload_class],
            timeout_seconds=MAX_DEADLINE_SECONDS + 60,
            max_concurrency=COORDINATOR_CONCURRENCY,
            coordinator=True,
            accepts_any=True,
            description=description,
        )
