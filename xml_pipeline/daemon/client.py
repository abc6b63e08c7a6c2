"""A small synchronous client for the daemon's HTTP interface, used by the CLI.

The standard library's http.client is enough here: one request at a time, no
event loop, and a Unix socket is one ``connect`` away. Over TCP it speaks TLS
when given the CA that signed the daemon's certificate (``tls_ca``), and
sends a bearer token when given one.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode


class DaemonUnreachable(Exception):
    """No daemon answers at the address; the message says where we looked."""


class DoorRefused(Exception):
    """The daemon refused the request itself: no or a wrong token (401), too many requests (429)."""

    def __init__(self, status: int, reason: str, retry_after: str | None) -> None:
        later = f"; retry after {retry_after}s" if retry_after else ""
        super().__init__(f"the daemon refused the request (HTTP {status}): {reason}{later}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        if not isinstance(data, dict):
            raise ValueError("the daemon answered with something other than a JSON object")
        return data


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


class DaemonClient:
    def __init__(
        self,
        *,
        socket_path: Path | None = None,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path and tcp")
        if tls_ca is not None and tcp is None:
            raise ValueError("TLS is for TCP; the Unix socket is guarded by its file permissions")
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self._tls = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca is not None else None

    @property
    def address(self) -> str:
        return str(self.socket_path) if self.socket_path is not None else f"{self.tcp[0]}:{self.tcp[1]}"  # type: ignore[index]

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self.socket_path is not None:
            connection = _UnixConnection(self.socket_path, timeout)
        elif self._tls is not None:
            assert self.tcp is not None
            connection = http.client.HTTPSConnection(self.tcp[0], self.tcp[1], timeout=timeout, context=self._tls)
        else:
            assert self.tcp is not None
            connection = http.client.HTTPConnection(self.tcp[0], self.tcp[1], timeout=timeout)
        return connection

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Content-Type": "application/xml"} if body is not None else {}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, path: str, *, body: bytes | None = None, timeout: float = 10.0) -> Response:
        connection = self._connection(timeout)
        try:
            connection.request(method, path, body=body, headers=self._headers(body))
            answer = connection.getresponse()
            response = Response(answer.status, answer.read())
        except ssl.SSLError as exc:
            raise DaemonUnreachable(f"no TLS connection with {self.address}: {exc.reason or exc}") from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(f"no daemon is listening on {self.address} ({exc.strerror})") from None
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon on {self.address} did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise DaemonUnreachable(f"cannot talk to the daemon on {self.address}: {exc}") from None
        finally:
            connection.close()
        if response.status in (401, 429):
            try:
                reason = str(response.json().get("error"))
            except ValueError:
                reason = response.body[:200].decode(errors="replace")
            raise DoorRefused(response.status, reason, answer.getheader("Retry-After"))
        return response

    def send(self, envelope: bytes, *, wait: str, timeout: float) -> Response:
        query = urlencode({"wait": wait, "timeout": f"{timeout:g}"})
        return self.request("POST", f"/messages?{query}", body=envelope, timeout=timeout + 5)

    def replies(self, thread: str, *, wait: str, timeout: float) -> Response:
        query = urlencode({"wait": wait, "timeout": f"{timeout:g}"})
        return self.request("GET", f"/threads/{thread}/replies?{query}", timeout=timeout + 5)

    def stream(self, path: str, *, timeout: float) -> Iterator[bytes]:
        """The lines of a streamed answer (``GET /events``) as they come; ``timeout`` bounds each wait for one.

        A refusal (any status but 200) is raised as :class:`DoorRefused` with the daemon's reason.
        """
        connection = self._connection(timeout)
        try:
            try:
                connection.request("GET", path, headers=self._headers(None))
                answer = connection.getresponse()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonUnreachable(f"no daemon is listening on {self.address} ({exc.strerror})") from None
            except OSError as exc:
                raise DaemonUnreachable(f"cannot talk to the daemon on {self.address}: {exc}") from None
            if answer.status != 200:
                body = Response(answer.status, answer.read())
                try:
                    reason = str(body.json().get("error"))
                except ValueError:
                    reason = body.body[:200].decode(errors="replace")
                raise DoorRefused(answer.status, reason, answer.getheader("Retry-After"))
            while line := answer.readline():
                yield line
        finally:
            connection.close()

    def trace(self, thread: str, *, with_xml: bool) -> Response:
        return self.request("GET", f"/threads/{thread}/trace" + ("?xml=1" if with_xml else ""))

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/status").json()

    def metrics(self) -> str:
        return self.request("GET", "/metrics").body.decode()
