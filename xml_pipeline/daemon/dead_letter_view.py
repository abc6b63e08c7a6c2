"""The dead letters the web view lists, read from the durable engine's Redis.

Only the durable engine has dead letters, so the daemon builds this view
beside that engine and has none otherwise; the web view then says the mode
is off instead of asking an engine that cannot answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from xml_pipeline.cluster.engine import DurableEngine
from xml_pipeline.cluster.hop import Hop


class DeadLetterView:
    def __init__(self, engine: DurableEngine) -> None:
        self._engine = engine

    async def latest(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` dead letters as JSON rows; raises what redis raises, or TimeoutError."""
        async with asyncio.timeout(self._engine.backend.socket_timeout):
            rows = await self._engine.dead_letter_rows(count)
        letters = []
        for entry_id, fields in rows:
            hop = Hop.from_fields(fields)
            letters.append(
                {
                    "id": entry_id.decode(),
                    "listener": fields[b"listener"].decode(),
                    "deliveries": int(fields[b"deliveries"]),
                    "failed_at": float(fields[b"failed_at"]),
                    "conversation": hop.conversation,
                    "from": hop.sender,
                    "xml": hop.payload_xml.decode("utf-8", "replace"),
                }
            )
        return letters
