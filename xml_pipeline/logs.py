"""One line per event on stderr, in a form journald and grep both like.

Tracebacks are folded onto the event's line (`` | `` between frames) so a log
line is always a whole event, whichever library logged it.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _LineFormatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.as_json:
            return json.dumps(
                {"ts": stamp, "level": record.levelname.lower(), "logger": record.name, "msg": message},
                ensure_ascii=False,
            )
        return f"{stamp} {record.levelname} {record.name} {message.replace(chr(10), ' | ')}"


def set_level(level: str) -> None:
    """One level for every logger: ours and the libraries' alike, so ``debug`` means debug everywhere."""
    logging.getLogger().setLevel(level.upper())


def configure_logging(level: str = "info", *, as_json: bool = False) -> None:
    """Send every logger's records, the libraries' too, through one formatter on stderr.

    The handler sits on the root logger, not on ``xml_pipeline``: aiohttp,
    asyncio and redis-py log there as well, and a line of theirs in another
    form (a bare multi-line traceback, plain text amid ``--log-json``) would
    break journald's one-event-per-line and every JSON reader.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(as_json))
    logging.getLogger().handlers[:] = [handler]
    set_level(level)
