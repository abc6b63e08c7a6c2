"""The daemon's observation routes, behind the same door (auth, rate limits) as the rest of HTTP.

    GET /threads/{thread}/trace     a conversation's call tree (JSON; ?xml=1 adds the payloads)
    GET /events                     the live tail: server-sent events (?listener=NAME, ?errors=1)
    GET /ui                         the web view (static files shipped in the package)
    GET /ui/api/graph               listeners, peers and this daemon's totals per listener and edge
    GET /ui/api/conversations       the latest conversations traced, running and finished
    GET /ui/api/dead-letters        dead letters, with delivery at-least-once

They show other clients' conversations, so a client that identified itself
with a token sees only the traces of conversations it started, and not the
tail or the web view; those are for operators (the Unix socket, or a door
without auth).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

from aiohttp import web
from redis.exceptions import RedisError

from xml_pipeline.daemon.dead_letter_view import DeadLetterView
from xml_pipeline.message_bus.client_access import ClientAccess
from xml_pipeline.message_bus.engine import Engine
from xml_pipeline.observe.hub import TooManyWatchers, tail_event
from xml_pipeline.observe.setup import Observing
from xml_pipeline.observe.trace import assemble

log = logging.getLogger("xml_pipeline.daemon")

KEEPALIVE_SECONDS = 15.0
"""A comment line this often keeps proxies from closing a quiet tail, and finds watchers that left."""
WRITE_SECONDS = 30.0
"""A watcher that takes nothing for this long is disconnected (it lost events all the while anyway)."""
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
RECENT_CONVERSATIONS = 50
DEAD_LETTERS_SHOWN = 50

Route = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


class ObservedDaemon(Protocol):
    engine: Engine
    observing: Observing
    dead_letters: DeadLetterView | None
    """None unless the organism runs with delivery at-least-once: only then are there dead letters."""


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, ensure_ascii=False), status=status, content_type="application/json")


def _operators_only(access: ClientAccess) -> web.Response | None:
    if access.identity is None:
        return None
    return _json(
        {"error": f"client {access.identity!r} may not watch the organism (operators may)", "code": "forbidden"},
        status=403,
    )


def observe_routes(daemon: ObservedDaemon, access_of: Callable[[web.Request], ClientAccess]) -> list[Route]:
    observing = daemon.observing
    ui = resources.files("xml_pipeline.observe") / "ui"

    async def get_trace(request: web.Request) -> web.Response:
        thread = request.match_info["thread"]
        store = observing.store
        if store is None:
            return _json({"error": "tracing is off (observe.trace_retention_seconds is 0)"}, status=404)
        try:
            stored = await store.trace(thread)
        except (RedisError, OSError, TimeoutError) as exc:
            return _json({"error": f"the trace store cannot be read: {exc}"}, status=503)
        if stored is None:
            return _json({"error": f"no trace is kept for {thread} (unknown, or past its retention)"}, status=404)
        trace = assemble(thread, stored.records, stored.dropped, with_xml=request.query.get("xml") == "1")
        identity = access_of(request).identity
        if identity is not None and not any(hop["from"] == identity for hop in trace["hops"]):
            return _json({"error": f"no trace is kept for {thread} (unknown, or past its retention)"}, status=404)
        return _json(trace)

    async def events(request: web.Request) -> web.StreamResponse:
        refused = _operators_only(access_of(request))
        if refused is not None:
            return refused
        try:
            watcher = observing.hub.watch(request.query.get("listener") or None, request.query.get("errors") == "1")
        except TooManyWatchers as exc:
            return _json({"error": str(exc)}, status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await _send(response, b": watching\n\n")
            while not observing.hub.closed:
                try:
                    async with asyncio.timeout(KEEPALIVE_SECONDS):
                        await watcher.ready.wait()
                except TimeoutError:
                    await _send(response, b": keep-alive\n\n")
                    continue
                found, dropped = watcher.take()
                chunks = [f"event: dropped\ndata: {json.dumps({'dropped': dropped})}\n\n"] if dropped else []
                chunks += [f"data: {json.dumps(tail_event(event), ensure_ascii=False)}\n\n" for event in found]
                if chunks:
                    await _send(response, "".join(chunks).encode())
        except (ConnectionError, TimeoutError) as exc:
            log.info("a tail watcher left: %s", exc or type(exc).__name__)
        finally:
            observing.hub.forget(watcher)
        return response

    async def ui_page(request: web.Request) -> web.StreamResponse:
        refused = _operators_only(access_of(request))
        if refused is not None:
            return refused
        name = request.match_info.get("name") or "index.html"
        if name not in UI_FILES:
            raise web.HTTPNotFound()
        return web.Response(body=(ui / name).read_bytes(), content_type=UI_FILES[name])

    async def graph(request: web.Request) -> web.Response:
        refused = _operators_only(access_of(request))
        if refused is not None:
            return refused
        snapshot = observing.graph.snapshot(daemon.engine.listeners)
        snapshot["organism"] = daemon.engine.organism.name
        snapshot["durable"] = daemon.dead_letters is not None
        return _json(snapshot)

    async def conversations(request: web.Request) -> web.Response:
        refused = _operators_only(access_of(request))
        if refused is not None:
            return refused
        if observing.store is None:
            return _json({"tracing": False, "conversations": []})
        try:
            recent = await observing.store.recent(RECENT_CONVERSATIONS)
        except (RedisError, OSError, TimeoutError) as exc:
            return _json({"error": f"the trace store cannot be read: {exc}"}, status=503)
        return _json({"tracing": True, "conversations": recent})

    async def dead_letters(request: web.Request) -> web.Response:
        refused = _operators_only(access_of(request))
        if refused is not None:
            return refused
        if daemon.dead_letters is None:
            return _json({"mode": False, "dead_letters": []})
        try:
            letters = await daemon.dead_letters.latest(DEAD_LETTERS_SHOWN)
        except (RedisError, OSError, TimeoutError) as exc:
            return _json({"error": f"redis: {exc}"}, status=503)
        return _json({"mode": True, "dead_letters": letters})

    return [
        ("GET", "/threads/{thread}/trace", get_trace),
        ("GET", "/events", events),
        ("GET", "/ui", ui_page),
        ("GET", "/ui/{name}", ui_page),
        ("GET", "/ui/api/graph", graph),
        ("GET", "/ui/api/conversations", conversations),
        ("GET", "/ui/api/dead-letters", dead_letters),
    ]


async def _send(response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(WRITE_SECONDS):
        await response.write(data)
