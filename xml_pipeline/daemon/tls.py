"""TLS for the TCP door, and the rule for when it is required.

The HTTP door on TCP is the one other machines can reach. Plain HTTP is
allowed only on the loopback exemption: exactly ``127.0.0.1``, ``::1`` and
``localhost``. Any other address, the rest of 127.0.0.0/8 included, is
treated as reachable from elsewhere and needs both a ``tls`` section (so
tokens and messages are not readable on the wire) and an ``auth`` section
(so the door knows who is talking). Keeping the exemption to three names,
rather than every loopback address, makes the rule easy to state and lets
the tests exercise the non-loopback path on 127.0.0.2 without any traffic
leaving the machine.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

LOOPBACK_EXEMPT = frozenset({"127.0.0.1", "::1", "localhost"})


class TlsSetupError(Exception):
    """A certificate, key or CA cannot be used; the message says which and why."""


def exposure_problem(host: str, *, has_tls: bool, has_auth: bool) -> str | None:
    """Why serving plain or anonymous HTTP on ``host`` is refused, or None when it is allowed."""
    if host in LOOPBACK_EXEMPT or (has_tls and has_auth):
        return None
    missing = " and ".join(
        section for section, present in (("a tls section", has_tls), ("an auth section", has_auth)) if not present
    )
    return (
        f"{host} is beyond loopback (only 127.0.0.1, ::1 and localhost are exempt): other machines may reach it,"
        f" so it needs {missing}"
    )


def server_context(tls: Mapping[str, Any]) -> ssl.SSLContext:
    """The context for organism.yaml's ``tls`` section: certificate and key, and client certificates if asked."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls["cert"], tls["key"])
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot use tls.cert {tls['cert']} with tls.key {tls['key']}: {_reason(exc)}") from None
    client_ca = tls.get("client_ca")
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"cannot use tls.client_ca {client_ca}: {_reason(exc)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return str(exc.strerror or exc)
