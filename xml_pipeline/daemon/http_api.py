"""The daemon's HTTP interface (served on a Unix socket, optionally loopback TCP).

    POST /messages                  an envelope in, {"thread": ...} out (202)
         ?wait=first|end&timeout=S  ... or wait for replies in the same request (200)
    GET  /threads/{thread}/replies  collect replies (?wait=none|first|end&timeout=S)
    GET  /healthz                   200 while serving, 503 while stopping
    GET  /status                    listeners, queue depth, in-flight work, threads, uptime
    GET  /metrics                   Prometheus text format
    GET  /threads/{thread}/trace, /events, /ui...   seeing it work: :mod:`xml_pipeline.daemon.observe_api`

Replies are envelopes, as strings in JSON, so shell users can pipe them
through ``jq -r '.replies[]'``. A message refused at the door answers with a
4xx (or 503 when retrying may help) and the SystemError envelope in the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from xml_pipeline.daemon.auth import DoorAuth, Unauthorized
from xml_pipeline.daemon.dead_letter_view import DeadLetterView
from xml_pipeline.daemon.door import ConnectionGuard
from xml_pipeline.daemon.metrics import CONTENT_TYPE, PrometheusMetrics
from xml_pipeline.daemon.observe_api import observe_routes
from xml_pipeline.daemon.rate_limit import RateLimiter
from xml_pipeline.memory.store_watch import StoreState
from xml_pipeline.message.system_payloads import ErrorCode
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.engine import WAIT_MODES, Collection, Engine, Refused
from xml_pipeline.observe.events import Observation
from xml_pipeline.observe.setup import Observing

log = logging.getLogger("xml_pipeline.daemon")

MAX_WAIT_SECONDS = 300.0
DEFAULT_WAIT_SECONDS = 10.0
ACCESS = "xml_pipeline.access"
"""Where the request keeps what its client may do (set by the door's identify_client middleware)."""

STATUS_FOR_CODE = {
    ErrorCode.MALFORMED_XML: 400,
    ErrorCode.FORBIDDEN_DTD: 400,
    ErrorCode.UNSUPPORTED_ENCODING: 400,
    ErrorCode.TOO_DEEP: 400,
    ErrorCode.ENVELOPE_INVALID: 400,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.BODY_TIMEOUT: 408,
    ErrorCode.UNKNOWN_TARGET: 404,
    ErrorCode.PEER_NOT_ALLOWED: 403,
    ErrorCode.SENDER_FORBIDDEN: 403,
    ErrorCode.TARGET_FORBIDDEN: 403,
    ErrorCode.PAYLOAD_INVALID: 422,
    ErrorCode.HISTORY_FULL: 409,
    ErrorCode.OVERLOAD: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    ErrorCode.BACKEND_UNCERTAIN: 504,
}


class DaemonView(Protocol):
    """What the HTTP layer needs from the daemon."""

    engine: Engine
    metrics: PrometheusMetrics
    observing: Observing
    dead_letters: DeadLetterView | None

    @property
    def accepting(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    async def cluster_status(self) -> dict[str, Any] | None: ...


def _json(data: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=json.dumps(data, ensure_ascii=False), status=status, content_type="application/json", headers=headers
    )


def _problem(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return _json({"error": message, **extra}, status=status, headers=headers)


def _wait_parameters(request: web.Request, default_mode: str) -> tuple[str, float] | web.Response:
    mode = request.query.get("wait", default_mode)
    if mode not in WAIT_MODES:
        return _problem(400, f"wait must be one of {', '.join(WAIT_MODES)}")
    try:
        timeout = float(request.query.get("timeout", DEFAULT_WAIT_SECONDS))
    except ValueError:
        return _problem(400, "timeout must be a number of seconds")
    if not 0 <= timeout <= MAX_WAIT_SECONDS:
        return _problem(400, f"timeout must be between 0 and {MAX_WAIT_SECONDS:g} seconds")
    return mode, timeout


def _replies_body(thread: str, collection: Collection | None) -> dict[str, Any]:
    """Every reply collected, none left behind: so the conversation is complete exactly when it has ended."""
    ended = collection is not None and collection.ended
    return {
        "thread": thread,
        "replies": [reply.envelope.decode() for reply in collection.replies] if collection is not None else [],
        "ended": ended,
        "complete": ended,
    }


def _refused(refused: Refused) -> web.Response:
    """A message refused at the door: its SystemError, with the HTTP status its code maps to."""
    status = STATUS_FOR_CODE.get(refused.code, 400)
    return _json(
        {
            "thread": refused.thread,
            "accepted": False,
            "error": {
                "code": refused.code.value,
                "message": refused.detail,
                "retry_allowed": refused.code.retry_allowed,
            },
            "replies": [refused.envelope.decode()],
        },
        status=status,
        headers={"Retry-After": "1"} if status == 503 else None,
    )


def _over_socket(request: web.Request) -> bool:
    """Whether the request came through the Unix socket (its address is a path, a TCP one a tuple)."""
    transport = request.transport
    return transport is None or not isinstance(transport.get_extra_info("sockname"), tuple)


def _access(request: web.Request) -> ClientAccess:
    access: ClientAccess = request[ACCESS]
    return access


def _client_key(request: web.Request, access: ClientAccess) -> str:
    """Whose bucket a request takes from: its token's identity, else its address, else the socket."""
    if access.identity is not None:
        return f"client:{access.identity}"
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return f"address:{peer[0]}" if isinstance(peer, tuple) else "socket"


def build_app(
    daemon: DaemonView,
    *,
    max_body_bytes: int,
    door: ConnectionGuard,
    auth: DoorAuth,
    rate_limiter: RateLimiter | None = None,
) -> web.Application:
    @web.middleware
    async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Tell the door which connections are busy, so it never times out or evicts one mid-request."""
        door.request_started(request.transport)
        try:
            return await handler(request)
        finally:
            door.request_finished(request.transport)

    @web.middleware
    async def identify_client(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Who is asking, from the bearer token (or the socket's permissions): 401 before anything is read."""
        if request.path == "/healthz":
            return await handler(request)  # for load balancers and probes, which hold no token
        access = auth.access_for(request.headers.get("Authorization"), over_socket=_over_socket(request))
        if isinstance(access, Unauthorized):
            return _json(
                {"error": access.reason, "code": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="xml-pipeline"'},
            )
        if rate_limiter is not None:
            wait = rate_limiter.take(_client_key(request, access))
            if wait:
                return _json(
                    {"error": "too many requests from this client; slow down", "code": "rate-limited"},
                    status=429,
                    headers={"Retry-After": str(math.ceil(wait))},
                )
        request[ACCESS] = access
        return await handler(request)

    app = web.Application(client_max_size=max_body_bytes, middlewares=[count_requests, identify_client])
    body_timeout = door.limits.body_timeout_seconds

    async def read_body(request: web.Request) -> bytes | tuple[ErrorCode, str]:
        """The request's body, or why not: too large (said before reading when the length is known), too slow.

        A client that hangs up mid-body is an everyday event, not a fault of
        ours: one INFO line, and the request ends with nobody left to answer.
        """
        if request.content_length is not None and request.content_length > max_body_bytes:
            return ErrorCode.TOO_LARGE, f"the body is {request.content_length} bytes; the limit is {max_body_bytes}"
        door.reading_body(request.transport, True)
        try:
            async with asyncio.timeout(body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return ErrorCode.TOO_LARGE, f"the body is over the limit of {max_body_bytes} bytes"
        except TimeoutError:
            return ErrorCode.BODY_TIMEOUT, f"the body did not arrive within {body_timeout:g}s"
        except ConnectionError as exc:
            log.info("a client went away before its body arrived (%s); nothing of it was used", exc)
            raise web.HTTPBadRequest(text="the connection was lost before the body arrived") from None
        finally:
            door.reading_body(request.transport, False)

    async def post_message(request: web.Request) -> web.Response:
        wait = _wait_parameters(request, "none")
        if isinstance(wait, web.Response):
            return wait
        body: bytes | tuple[ErrorCode, str]
        engine = daemon.engine
        if not daemon.accepting:  # refused as a SystemError, like every refusal at the door, and logged once
            body = (ErrorCode.SHUTTING_DOWN, "the daemon is stopping and accepts no new messages")
        else:
            body = await read_body(request)
        access = _access(request)
        with Observation.joining(request.headers.get("traceparent")):
            outcome = engine.refuse(*body) if isinstance(body, tuple) else await engine.accept(body, access=access)
        if isinstance(outcome, Refused):
            return _refused(outcome)
        mode, timeout = wait
        if mode == "none":
            return _json({"thread": outcome.thread, "accepted": True}, status=202)
        try:
            collected = await engine.collect(outcome.thread, mode, timeout, owner=access.identity)
        except (RedisError, OSError) as exc:
            return _json(
                {
                    "thread": outcome.thread,
                    "accepted": True,
                    "error": f"stored, but its replies cannot be read now: {exc}",
                },
                status=202,
            )
        return _json({"accepted": True, **_replies_body(outcome.thread, collected)})

    async def get_replies(request: web.Request) -> web.Response:
        thread = request.match_info["thread"]
        wait = _wait_parameters(request, "first")
        if isinstance(wait, web.Response):
            return wait
        try:
            collected = await daemon.engine.collect(thread, *wait, owner=_access(request).identity)
        except (RedisError, OSError) as exc:
            return _problem(503, f"the replies cannot be read now (redis: {exc}); ask again")
        if collected is None:
            return _problem(404, f"no replies are kept for thread {thread} (unknown, collected, or expired)")
        return _json(_replies_body(thread, collected))

    async def healthz(request: web.Request) -> web.Response:
        """Answers from what the daemon already knows: never waits for the store or the pump."""
        store = daemon.engine.store_watch.health
        if not daemon.accepting:
            return _json({"status": "stopping", "backend": store.as_dict()}, status=503)
        if store.state is not StoreState.OK:
            return _json({"status": "degraded", "backend": store.as_dict()}, status=503)
        return _json({"status": "ok", "backend": store.as_dict()})

    async def status(request: web.Request) -> web.Response:
        data = daemon.status()
        cluster = await daemon.cluster_status()
        if cluster is not None:
            data["cluster"] = cluster
        return _json(data)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=daemon.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    routes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
        ("POST", "/messages", post_message),
        ("GET", "/threads/{thread}/replies", get_replies),
        ("GET", "/healthz", healthz),
        ("GET", "/status", status),
        ("GET", "/metrics", metrics),
        *observe_routes(daemon, _access),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app
