"""Client tokens: the file that says who each bearer token stands for and what it may call.

The file (``auth.tokens_file`` in organism.yaml) is JSON, written by
``xml-pipeline token add|revoke``::

    {"format": "xml-pipeline-tokens/1",
     "clients": [{"name": "billing", "sha256": "9f86…", "listeners": ["greeter"],
                  "created": "2026-03-01T09:00:00Z"}]}

Only a hash of each token is kept, so a copy of the file (a backup, a stray
``cat``) lets nobody in. The hash is plain SHA-256, not a password KDF such as
scrypt: a KDF makes guessing *low-entropy* secrets slow, but our tokens are
256 random bits, which no amount of guessing finds, and a KDF would cost every
request milliseconds of CPU for nothing. Hashes are compared with
``hmac.compare_digest`` against every entry, so how long a lookup takes says
nothing about which bytes matched.

The file must be readable by its owner only (mode 0600): a token file that
others can write lets them grant themselves anything. A file with a looser
mode is refused, with the ``chmod`` to run.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

FORMAT = "xml-pipeline-tokens/1"
TOKEN_PREFIX = "xpt_"
"""Marks our tokens, so one pasted in the wrong place is recognisable (and greppable by secret scanners)."""
TOKEN_BYTES = 32


class TokenFileError(Exception):
    """The tokens file cannot be used; the message says why in a plain sentence."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True, slots=True)
class ClientGrant:
    """One client: its name (the ``from`` of its messages), its token's hash, the listeners it may call."""

    name: str
    sha256: str
    listeners: frozenset[str]
    created: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "listeners": sorted(self.listeners), "created": self.created}


@dataclass(frozen=True, slots=True)
class TokenBook:
    """Every client of an organism; immutable, so a reload swaps a whole book in one assignment."""

    clients: tuple[ClientGrant, ...] = ()

    def identify(self, token: str) -> ClientGrant | None:
        """The client this token stands for, or None. Compares with every entry, in constant time each."""
        digest = hash_token(token)
        found = None
        for client in self.clients:
            if hmac.compare_digest(client.sha256, digest):
                found = client
        return found

    def get(self, name: str) -> ClientGrant | None:
        return next((client for client in self.clients if client.name == name), None)

    def with_client(self, name: str, listeners: Iterable[str]) -> tuple[TokenBook, str]:
        """A book with a new client ``name`` and the token for it (shown once, never stored)."""
        if self.get(name) is not None:
            raise TokenFileError(f"client {name!r} has a token already; revoke it first")
        token = new_token()
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        grant = ClientGrant(name, hash_token(token), frozenset(listeners), created)
        return replace(self, clients=(*self.clients, grant)), token

    def without_client(self, name: str) -> TokenBook:
        if self.get(name) is None:
            raise TokenFileError(f"no client is named {name!r}")
        return replace(self, clients=tuple(client for client in self.clients if client.name != name))

    # ------------------------------------------------------------------ the file
    @classmethod
    def load(cls, path: Path) -> TokenBook:
        """Read and check ``path``: owner-only mode, the format, one entry per name."""
        try:
            with path.open("rb") as file:
                mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
                raw = file.read()
        except OSError as exc:
            hint = " (create it with: xml-pipeline token add NAME --listeners ...)" if not path.exists() else ""
            raise TokenFileError(f"cannot read the tokens file {path}: {exc.strerror or exc}{hint}") from None
        if mode & 0o077:
            raise TokenFileError(
                f"the tokens file {path} has mode {mode:04o}; others must not read or write it: chmod 600 {path}"
            )
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise TokenFileError(f"the tokens file {path} is not valid JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise TokenFileError(f"the tokens file {path} is not an {FORMAT} file")
        return cls(tuple(_read_entries(path, document.get("clients"))))

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a file), owner-only from the first byte."""
        document = {"format": FORMAT, "clients": [client.as_json() for client in self.clients]}
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(document, file, indent=2)
                file.write("\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    @classmethod
    def load_or_empty(cls, path: Path) -> TokenBook:
        """For ``token add``: a missing file is an empty book."""
        return cls.load(path) if path.exists() else cls()


def _read_entries(path: Path, entries: Any) -> Iterable[ClientGrant]:
    if not isinstance(entries, list):
        raise TokenFileError(f"the tokens file {path}: 'clients' must be a list")
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"the tokens file {path}: clients[{index}]"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where} must be a mapping")
        name, digest, listeners = entry.get("name"), entry.get("sha256"), entry.get("listeners")
        if not isinstance(name, str) or name in seen:
            raise TokenFileError(f"{where} needs a 'name' of its own")
        if not isinstance(digest, str) or len(digest) != 64:
            raise TokenFileError(f"{where} ({name}) needs a 'sha256' of 64 hex digits")
        if not isinstance(listeners, list) or not all(isinstance(item, str) for item in listeners):
            raise TokenFileError(f"{where} ({name}) needs 'listeners', a list of names")
        seen.add(name)
        yield ClientGrant(name, digest.lower(), frozenset(listeners), str(entry.get("created", "")))
