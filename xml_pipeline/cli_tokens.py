"""``xml-pipeline token add|list|revoke``: edit the tokens file that organism.yaml's ``auth`` names.

A running daemon reads the file again on SIGHUP (``systemctl reload``), so
a revoked token stops working at the next reload, not at the next restart.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from xml_pipeline.config.loader import ConfigError, read_token_setup
from xml_pipeline.daemon.tokens import TokenBook, TokenFileError
from xml_pipeline.message.envelope import LISTENER_NAME
from xml_pipeline.organism import is_reserved

EXIT_USAGE = 2
RELOAD_HINT = "the daemon applies it on SIGHUP (systemctl reload xml-pipeline, or kill -HUP its pid)"

organism_option = click.option(
    "-o",
    "--organism",
    default="organism.yaml",
    show_default=True,
    help="The organism.yaml whose auth.tokens_file to edit.",
)


def _fail(message: str) -> NoReturn:
    click.echo(f"xml-pipeline: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _setup(organism: str) -> tuple[Path, dict[str, bool]]:
    try:
        return read_token_setup(organism)
    except ConfigError as exc:
        _fail(str(exc))


def _book(path: Path, *, missing_is_empty: bool = False) -> TokenBook:
    try:
        return TokenBook.load_or_empty(path) if missing_is_empty else TokenBook.load(path)
    except TokenFileError as exc:
        _fail(str(exc))


@click.group()
def token() -> None:
    """Client tokens: who may send, as whom, to which listeners."""


@token.command()
@click.argument("name")
@click.option("--listeners", required=True, help="Comma-separated listeners this client may call.")
@organism_option
def add(name: str, listeners: str, organism: str) -> None:
    """Make a token for client NAME and print it (once: only its hash is kept).

    NAME is the client's identity: its messages must be sent `from` NAME.
    """
    path, known = _setup(organism)
    if not LISTENER_NAME.match(name) or is_reserved(name) or name in known:
        _fail(f"{name!r} cannot name a client: use letters, digits, _ and -, and no listener's or system name")
    granted = [item.strip() for item in listeners.split(",") if item.strip()]
    unknown = [item for item in granted if item not in known]
    if not granted or unknown:
        _fail(f"--listeners must name listeners of {organism}; unknown: {', '.join(unknown) or '(none given)'}")
    book = _book(path, missing_is_empty=True)
    try:
        book, secret = book.with_client(name, granted)
    except TokenFileError as exc:
        _fail(str(exc))
    book.save(path)
    closed = [item for item in granted if not known[item]]
    if closed:
        click.echo(
            f"note: {', '.join(closed)} not open to clients (no 'ingress: true'); calls will be refused", err=True
        )
    click.echo(f"client {name!r} may call {', '.join(granted)}; {RELOAD_HINT}", err=True)
    click.echo(secret)


@token.command(name="list")
@organism_option
def list_tokens(organism: str) -> None:
    """Show each client, its listeners and when its token was made (never the token)."""
    path, _ = _setup(organism)
    for client in _book(path).clients:
        click.echo(f"{client.name}\t{','.join(sorted(client.listeners))}\t{client.created}")


@token.command()
@click.argument("name")
@organism_option
def revoke(name: str, organism: str) -> None:
    """Remove client NAME's token."""
    path, _ = _setup(organism)
    try:
        book = _book(path).without_client(name)
    except TokenFileError as exc:
        _fail(str(exc))
    book.save(path)
    click.echo(f"client {name!r} revoked; {RELOAD_HINT}", err=True)
