"""The daemon: an engine, its HTTP doors, and what systemd and operators expect of a service.

Lifecycle::

    start engine -> bind sockets -> READY=1 -> serve
      SIGHUP   -> RELOADING=1 -> re-read organism.yaml -> swap listeners (or keep the old) -> READY=1
      SIGTERM  -> STOPPING=1 -> refuse new messages -> drain (deadline) -> let clients
      SIGINT      collect their last replies (grace) -> close sockets -> exit 0

Signals only put a command on a small queue; the main loop carries commands
out one at a time, so a reload never overlaps another reload or the shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from xml_pipeline import __version__
from xml_pipeline.cluster.engine import DurableEngine, DurableSettings
from xml_pipeline.collector import settle_for_serving
from xml_pipeline.config.loader import ConfigError, load_organism, parse_tcp_address
from xml_pipeline.daemon.auth import DoorAuth
from xml_pipeline.daemon.dead_letter_view import DeadLetterView
from xml_pipeline.daemon.door import ConnectionGuard, DoorLimits, default_max_connections
from xml_pipeline.daemon.http_api import build_app
from xml_pipeline.daemon.metrics import PrometheusMetrics
from xml_pipeline.daemon.notify import SystemdNotifier
from xml_pipeline.daemon.paths import default_socket_path
from xml_pipeline.daemon.rate_limit import RateLimiter
from xml_pipeline.daemon.tls import TlsSetupError, exposure_problem, server_context
from xml_pipeline.daemon.tokens import TokenFileError
from xml_pipeline.logs import set_level
from xml_pipeline.memory.manager_backend import ManagerBackend
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.shared_backend import SharedBackend
from xml_pipeline.message_bus.engine import Engine
from xml_pipeline.message_bus.in_process import InProcessEngine
from xml_pipeline.message_bus.metrics import PumpMetrics
from xml_pipeline.message_bus.pump import PumpStartError
from xml_pipeline.observe.setup import Observing
from xml_pipeline.organism import Organism

log = logging.getLogger("xml_pipeline.daemon")

HOUSEKEEPING_SECONDS = 5.0
DOOR_SWEEP_SECONDS = 1.0
HTTP_SHUTDOWN_SECONDS = 5.0
LISTEN_BACKLOG = 1024
"""Connections the kernel queues before accept(); a full Unix-socket backlog refuses
clients outright (EAGAIN) instead of making them wait, so keep it deep."""
HTTP_BODY_SLACK = 4096
"""HTTP bodies may exceed max_message_bytes a little, so the pump (not aiohttp)
answers a slightly oversized message with a proper too-large SystemError."""
RESTART_ONLY_SETTINGS = (
    "socket",
    "tcp",
    "drain_timeout_seconds",
    "reply_retention_seconds",
    "log_format",
    "backend",
    "process_pool",
    "http",
    "auth",
    "tls",
    "observe",
)


class DaemonStartError(Exception):
    """The daemon cannot start (socket taken, address in use...); the message says why."""


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    socket_path: Path
    tcp: tuple[str, int] | None
    drain_timeout: float
    reply_retention: float
    door: DoorLimits
    collect_grace: float = 5.0

    @classmethod
    def for_organism(
        cls,
        organism: Organism,
        *,
        socket_path: str | None = None,
        tcp: str | None = None,
        drain_timeout: float | None = None,
    ) -> DaemonOptions:
        """Command-line values win over organism.yaml, which wins over defaults."""
        settings = organism.settings
        configured_socket = socket_path or settings.get("socket")
        if configured_socket:
            path = Path(configured_socket)
            if not path.is_absolute() and socket_path is None and settings.get("base_dir"):
                path = Path(settings["base_dir"]) / path
        else:
            path = default_socket_path(organism.name)
        address = tcp or settings.get("tcp")
        endpoint = parse_tcp_address(address) if address else None
        if endpoint is not None:
            exposed = exposure_problem(
                endpoint[0], has_tls=bool(settings.get("tls")), has_auth=bool(settings.get("auth"))
            )
            if exposed is not None:
                raise ValueError(exposed)
        http = settings.get("http", {})
        return cls(
            socket_path=path,
            tcp=endpoint,
            drain_timeout=float(drain_timeout or settings.get("drain_timeout_seconds", 20.0)),
            reply_retention=float(settings.get("reply_retention_seconds", 300.0)),
            door=DoorLimits(
                max_connections=int(http.get("max_connections") or default_max_connections()),
                header_timeout_seconds=float(http.get("header_timeout_seconds", 10.0)),
                body_timeout_seconds=float(http.get("body_timeout_seconds", 30.0)),
            ),
        )


class Daemon:
    def __init__(
        self,
        organism: Organism,
        organism_path: Path,
        options: DaemonOptions,
        backend: SharedBackend,
        *,
        serve: frozenset[str] | None = None,
    ) -> None:
        self.organism_path = organism_path
        self.options = options
        self.backend = backend
        self.notifier = SystemdNotifier()
        self.metrics = PrometheusMetrics(lambda: self.engine.stats())
        self.engine: Engine
        self.dead_letters: DeadLetterView | None
        self.engine, self.dead_letters = _engine_for(organism, backend, serve, options, self.metrics)
        self.observing = Observing(organism, backend, self.engine.observe)
        self.door = ConnectionGuard(options.door)
        http = organism.settings.get("http", {})
        rate = http.get("rate_per_second")
        self.rate_limiter = RateLimiter(float(rate), int(http.get("rate_burst") or math.ceil(rate))) if rate else None
        try:
            self.auth = DoorAuth.from_settings(organism.settings.get("auth", {}))
        except TokenFileError as exc:
            raise DaemonStartError(str(exc)) from None
        self._servers: list[asyncio.Server] = []
        self._accepting = False
        self._commands: asyncio.Queue[str] = asyncio.Queue(maxsize=4)
        self._stopped = asyncio.Event()
        self._started_at = time.monotonic()
        self._exit_code = 0

    # ------------------------------------------------------------------ views for the HTTP layer
    @property
    def accepting(self) -> bool:
        return self._accepting

    def status(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {
            "organism": self.engine.organism.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            "accepting": self._accepting,
            "socket": str(self.options.socket_path),
            "tcp": f"{self.options.tcp[0]}:{self.options.tcp[1]}" if self.options.tcp else None,
            "backend": self.engine.organism.settings.get("backend", {}).get("type", "memory"),
            "backend_health": self.engine.store_watch.health.as_dict(),
            "state_manager_pid": self.backend.manager_pid if isinstance(self.backend, ManagerBackend) else None,
            "worker_pids": self.engine.pool.worker_pids() if self.engine.pool is not None else [],
            "queue_depth": stats.queue_depth,
            "in_flight": stats.in_flight,
            "conversations": stats.conversations,
            "threads": stats.threads,
            "uncollected_replies": stats.uncollected_replies,
            "uncollected_reply_bytes": stats.uncollected_reply_bytes,
            "connections": self.door.counts(),
            "observe": self.observing.stats(),
            "listeners": [
                {
                    "name": listener.name,
                    "description": listener.description,
                    "accepts": sorted(codec.xml_name for codec in listener.codecs_by_tag.values()),
                    "peers": None if listener.peers is None else sorted(listener.peers),
                    "agent": listener.agent,
                    "ingress": listener.ingress,
                    "timeout_seconds": listener.timeout_seconds,
                    "max_concurrency": listener.max_concurrency,
                }
                for listener in self.engine.listeners.values()
            ],
        }

    async def cluster_status(self) -> dict[str, Any] | None:
        """Every live daemon and each listener's backlog, for the durable mode; None otherwise."""
        return await self.engine.cluster_status()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._command, "stop")
        loop.add_signal_handler(signal.SIGINT, self._command, "stop")
        loop.add_signal_handler(signal.SIGHUP, self._command, "reload")
        try:
            await self.engine.start()
        except PumpStartError as exc:
            raise DaemonStartError(str(exc)) from None
        except (RedisError, OSError) as exc:
            raise DaemonStartError(f"the durable engine cannot reach redis: {exc}") from None
        try:
            runner = await self._serve_http()
        except BaseException:
            await self.engine.stop(drain_timeout=0)
            raise
        await self.observing.start()  # what the engine reported meanwhile is buffered, bounded
        settle_for_serving()  # loaded: what is alive now lives as long as the daemon
        self._accepting = True
        where = str(self.options.socket_path) + (
            f" and {self.options.tcp[0]}:{self.options.tcp[1]}" if self.options.tcp else ""
        )
        log.info("daemon ready organism=%s pid=%d listening on %s", self.engine.organism.name, os.getpid(), where)
        self.notifier.ready(status=f"serving {self.engine.organism.name}")
        try:
            async with asyncio.TaskGroup() as group:
                if self.notifier.watchdog_interval is not None:
                    group.create_task(self._every(self.notifier.watchdog_interval, self._watchdog_tick))
                group.create_task(self._every(HOUSEKEEPING_SECONDS, self._housekeeping_tick))
                group.create_task(self._every(DOOR_SWEEP_SECONDS, self._door_tick))
                while await self._commands.get() == "reload":
                    await self._reload()
                self._stopped.set()
        finally:
            # Shutting down is under way: a repeated SIGTERM (an impatient operator, a
            # second kill) must not cut the drain short or kill the process mid-exit.
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
                signal.signal(signum, signal.SIG_IGN)
            await self._shutdown(runner)
        return self._exit_code

    def _command(self, command: str) -> None:
        """Called from a signal handler: queue the command; repeats of a pending one coalesce."""
        try:
            self._commands.put_nowait(command)
        except asyncio.QueueFull:
            log.warning("signal ignored: %d commands are already waiting", self._commands.qsize())

    async def _every(self, interval: float, tick: Callable[[], None]) -> None:
        while not self._stopped.is_set():
            try:
                async with asyncio.timeout(interval):
                    await self._stopped.wait()
            except TimeoutError:
                tick()

    def _watchdog_tick(self) -> None:
        if self.engine.healthy:  # a dead dispatcher stops the pings, and systemd restarts us
            self.notifier.watchdog()

    def _door_tick(self) -> None:
        if self.rate_limiter is not None:
            self.rate_limiter.sweep()
        closed = self.door.sweep()
        if closed:
            timeout = self.options.door.header_timeout_seconds
            log.info("closed %d connection(s) that sent no complete request within %gs", closed, timeout)

    def _housekeeping_tick(self) -> None:
        self.observing.sweep()
        if not self.engine.healthy:
            why = self.engine.store_watch.health.detail or "the pump stopped working"
            log.critical("%s; exiting so that the service manager restarts the daemon", why)
            self._exit_code = 1
            self._command("stop")

    async def _reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading %s", self.organism_path)
        self.auth.reload()  # even when the organism edit is refused below: a revocation must never wait
        try:
            organism = await asyncio.to_thread(load_organism, self.organism_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused: %s", problem.render(str(self.organism_path)))
            log.error("reload failed with %d problem(s); the previous organism keeps running", len(exc.problems))
            self.metrics.reload(succeeded=False)
            self.notifier.ready(status=f"reload failed ({len(exc.problems)} problems); serving the previous organism")
            return
        old = self.engine.organism
        for key in RESTART_ONLY_SETTINGS:
            if old.settings.get(key) != organism.settings.get(key):
                log.warning("organism.%s changed; it takes effect at the next restart", key)
        if organism.limits != old.limits:
            log.warning("pump limits changed; they take effect at the next restart")
        self.engine.reload(organism)
        set_level(str(organism.settings.get("log_level", "info")))
        self.metrics.reload(succeeded=True)
        log.info("reloaded organism=%s listeners=%d", organism.name, len(organism.listeners))
        self.notifier.ready(status=f"serving {organism.name}")

    async def _shutdown(self, runner: web.AppRunner) -> None:
        self._accepting = False
        self.notifier.stopping()
        log.info("stopping: draining in-flight work for up to %gs", self.options.drain_timeout)
        report = await self.engine.stop(self.options.drain_timeout)  # replies in memory stay collectable a while
        if report.cancelled:
            log.warning("stopping: %d message(s) were cut short and reported to their clients", report.cancelled)
        self.observing.hub.close()
        for server in self._servers:
            server.close()
        await runner.cleanup()
        await self.observing.stop()
        await self.door.close_all()
        self.options.socket_path.unlink(missing_ok=True)
        self.backend.close()
        self.notifier.close()
        log.info("stopped")

    # ------------------------------------------------------------------ sockets
    async def _serve_http(self) -> web.AppRunner:
        """Serve the app on our own listening sockets, every connection under the door's guard."""
        app = build_app(
            self,
            max_body_bytes=self.engine.limits.max_message_bytes + HTTP_BODY_SLACK,
            door=self.door,
            auth=self.auth,
            rate_limiter=self.rate_limiter,
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_SECONDS)
        await runner.setup()
        assert runner.server is not None
        tls_settings = self.engine.organism.settings.get("tls")
        try:
            tls = server_context(tls_settings) if tls_settings else None
        except TlsSetupError as exc:
            await runner.cleanup()
            raise DaemonStartError(str(exc)) from None
        loop = asyncio.get_running_loop()
        try:
            unix = _bind_unix_socket(self.options.socket_path)
            self._servers.append(
                await loop.create_server(self.door.wrap(runner.server), sock=unix, backlog=LISTEN_BACKLOG)
            )
            if self.options.tcp is not None:
                host, port = self.options.tcp
                protocol = self.door.wrap(runner.server, tls=tls)
                try:
                    server = await loop.create_server(protocol, host, port, backlog=LISTEN_BACKLOG, reuse_address=True)
                except OSError as exc:
                    raise DaemonStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
                self._servers.append(server)
        except BaseException:
            for started in self._servers:
                started.close()
            await runner.cleanup()
            raise
        return runner


BUILTIN_LISTENERS = frozenset({"system.sequence", "system.buffer"})


def _engine_for(
    organism: Organism,
    backend: SharedBackend,
    serve: frozenset[str] | None,
    options: DaemonOptions,
    metrics: PumpMetrics,
) -> tuple[Engine, DeadLetterView | None]:
    """The in-process engine; with ``delivery: at-least-once`` the durable one on Redis Streams and its dead letters."""
    settings = organism.settings.get("backend", {})
    if settings.get("delivery", "at-most-once") != "at-least-once":
        if serve is not None:
            raise DaemonStartError("--listeners needs delivery at-least-once: only then do daemons share the work")
        engine = InProcessEngine(
            organism,
            backend=backend,
            metrics=metrics,
            reply_retention_seconds=options.reply_retention,
            collect_grace_seconds=options.collect_grace,
        )
        return engine, None
    if not isinstance(backend, RedisBackend):
        raise DaemonStartError("delivery at-least-once needs the redis backend")
    unknown = sorted((serve or frozenset()) - set(organism.listeners) - BUILTIN_LISTENERS)
    if unknown:
        raise DaemonStartError(f"--listeners names no listener of this organism: {', '.join(unknown)}")
    durable = DurableEngine(
        organism,
        backend,
        DurableSettings.from_settings(settings, organism.settings, serve),
        metrics=metrics,
        collect_grace_seconds=options.collect_grace,
    )
    return durable, DeadLetterView(durable)


def _bind_unix_socket(path: Path) -> socket.socket:
    """Bind ``path`` with mode 0660, replacing a stale socket but never a live daemon's, nor any other file.

    The directory must be ours alone (see ``_claim_socket_directory``), and only
    a socket nobody answers on is removed: ``organism.socket`` naming a regular
    file by mistake must not cost that file.
    """
    _claim_socket_directory(path.parent)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise DaemonStartError(f"cannot inspect {path}: {exc.strerror or exc}") from None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise DaemonStartError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody answers: a leftover from a daemon that did not stop cleanly
        else:
            raise DaemonStartError(f"another daemon is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
    except OSError as exc:
        sock.close()
        raise DaemonStartError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def _claim_socket_directory(directory: Path) -> None:
    """Create the socket's directory (0750), or accept an existing one only if no one else controls it.

    Whoever may write to the directory may replace the socket with their own
    and read every client's messages; the default ``/tmp/xml-pipeline-<uid>``
    can be made in advance by any local user. So the directory must be a real
    directory (not a symlink, which its owner could repoint), owned by the
    daemon's user and writable by nobody else. A directory made here gets its
    mode set outright, since the umask would otherwise decide whether the
    group can reach the socket.
    """
    try:
        directory.mkdir(parents=True, mode=0o750)
        directory.chmod(0o750)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DaemonStartError(f"cannot create {directory}: {exc.strerror or exc}") from None
    try:
        found = os.lstat(directory)
    except OSError as exc:
        raise DaemonStartError(f"cannot inspect {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(found.st_mode):
        raise DaemonStartError(f"the socket directory {directory} is not a directory (a symlink or a file)")
    if found.st_uid != os.geteuid():
        raise DaemonStartError(
            f"the socket directory {directory} belongs to uid {found.st_uid}, not to this daemon's uid {os.geteuid()}"
        )
    if found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DaemonStartError(
            f"the socket directory {directory} is writable by others (mode {stat.S_IMODE(found.st_mode):04o});"
            " make it 0750 or 0700"
        )
