"""Who is knocking: bearer tokens checked at the door, before a request is handled.

With an ``auth`` section in organism.yaml every TCP request needs
``Authorization: Bearer <token>``; the Unix socket needs one only with
``auth.require_on_socket`` (otherwise its file permissions decide who gets in,
as without ``auth``). A token that is sent is always checked, on either door:
a wrong or revoked one is refused even where none was needed. A valid token
makes the request its client's: its messages must be ``from`` the client's
name, and may go only to the listeners the token grants.

The tokens file is read at start and again on every SIGHUP. A file that has
become unusable (bad JSON, loose mode) keeps the previous tokens in force and
says why in the log, so a slip while editing never opens or closes the door.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xml_pipeline.daemon.tokens import TokenBook, TokenFileError
from xml_pipeline.message_bus.client_access import ClientAccess

log = logging.getLogger("xml_pipeline.daemon")

WARN_EVERY_SECONDS = 10.0
BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Unauthorized:
    reason: str


class DoorAuth:
    def __init__(
        self,
        tokens_file: Path | None,
        *,
        require_on_socket: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens_file = tokens_file
        self.require_on_socket = require_on_socket
        self._book = TokenBook()
        self._clock = clock
        self._refused_since_warning = 0
        self._last_warning = float("-inf")
        if tokens_file is not None:
            self._book = TokenBook.load(tokens_file)

    @classmethod
    def from_settings(cls, auth: Mapping[str, Any]) -> DoorAuth:
        """From organism.yaml's ``auth`` section (empty: no tokens, doors open as file permissions allow)."""
        configured = auth.get("tokens_file")
        return cls(
            Path(configured) if configured else None,
            require_on_socket=bool(auth.get("require_on_socket", False)),
        )

    @property
    def enabled(self) -> bool:
        return self.tokens_file is not None

    @property
    def clients(self) -> int:
        return len(self._book.clients)

    def reload(self) -> None:
        """Re-read the tokens file; if it cannot be used, keep the tokens in force and log why."""
        if self.tokens_file is None:
            return
        try:
            self._book = TokenBook.load(self.tokens_file)
        except TokenFileError as exc:
            log.error("tokens not reloaded, the previous ones stay in force: %s", exc)
            return
        log.info("tokens reloaded: %d client(s)", len(self._book.clients))

    def access_for(self, authorization: str | None, *, over_socket: bool) -> ClientAccess | Unauthorized:
        """What the request with this ``Authorization`` header may do, or why it is refused."""
        if authorization is None:
            if not self.enabled or (over_socket and not self.require_on_socket):
                return ClientAccess.anonymous()
            return self._refuse("this door needs a token: send 'Authorization: Bearer <token>'")
        if not self.enabled:
            return ClientAccess.anonymous()  # no auth configured: a token proves nothing here, and costs nothing
        if not authorization.lower().startswith(BEARER):
            return self._refuse("the Authorization header must be 'Bearer <token>'")
        client = self._book.identify(authorization[len(BEARER) :].strip())
        if client is None:
            return self._refuse("the token is not valid (unknown, or revoked)")
        return ClientAccess.authenticated(client.name, client.listeners)

    def _refuse(self, reason: str) -> Unauthorized:
        """One warning per interval with a count: a client hammering with bad tokens cannot flood the log."""
        self._refused_since_warning += 1
        now = self._clock()
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            log.warning(
                "request refused (401): %s; %d refused since the last warning", reason, self._refused_since_warning
            )
            self._refused_since_warning = 0
            self._last_warning = now
        return Unauthorized(reason)
