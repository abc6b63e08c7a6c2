"""Start the real daemon as a subprocess and watch it the way systemd does."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import ROOT
from xml_pipeline.daemon.client import DaemonClient

EXAMPLE_LISTENERS, EXAMPLE_POOL = (
    (ROOT / "organism.yaml").read_text().split("listeners:", 1)[1].split("\nprocess_pool:", 1)
)


@contextlib.contextmanager
def short_directory() -> Iterator[Path]:
    """A short path: Unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="xp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.received: list[str] = []

    def expect(self, field: str, timeout: float = 15.0, alive: Callable[[], bool] = lambda: True) -> str:
        """Read datagrams until one carries ``field``; return that datagram.

        ``alive`` is asked between reads so that a sender that died fails the
        wait at once instead of at the timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {field} within {timeout}s; got {self.received}")
            if not alive():
                raise AssertionError(f"the sender exited before {field}; got {self.received}")
            self.socket.settimeout(min(remaining, 0.5))
            try:
                datagram = self.socket.recv(4096).decode()
            except TimeoutError:
                continue
            self.received.append(datagram)
            if field in datagram.split("\n"):
                return datagram

    def close(self) -> None:
        self.socket.close()


class DaemonProcess:
    def __init__(
        self,
        directory: Path,
        organism: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        open_files: int | None = None,
    ) -> None:
        self.socket_path = directory / "d.sock"
        self.notify = NotifySocket(directory / "notify.sock")
        self.log_path = directory / "daemon.log"
        environment = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify.path),
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        self._log = self.log_path.open("w")
        limit = [] if open_files is None else ["prlimit", f"--nofile={open_files}:{open_files}", "--"]
        self.process = subprocess.Popen(
            [
                *limit,
                sys.executable,
                "-m",
                "xml_pipeline",
                "run",
                str(organism),
                "--socket",
                str(self.socket_path),
                *extra,
            ],
            cwd=ROOT,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = DaemonClient(socket_path=self.socket_path)
        self._terminated = False

    def wait_ready(self) -> None:
        try:
            self.notify.expect("READY=1", alive=lambda: self.process.poll() is None)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ndaemon log:\n{self.log()}") from None

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)
        self._terminated = self._terminated or signum == signal.SIGTERM

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (unless the test sent it already) and the exit code."""
        if not self._terminated:
            self.signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()
        self.notify.close()


@contextlib.contextmanager
def running_daemon(
    organism: Path, *extra: str, env: dict[str, str] | None = None, open_files: int | None = None
) -> Iterator[DaemonProcess]:
    """The daemon, ready; ``open_files`` lowers its RLIMIT_NOFILE as systemd's LimitNOFILE would."""
    with short_directory() as directory:
        daemon = DaemonProcess(directory, organism, *extra, env=env, open_files=open_files)
        try:
            daemon.wait_ready()
            yield daemon
        finally:
            daemon.close()


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command line; ``env``, if given, replaces this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "xml_pipeline", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )


def write_organism(path: Path, extra_listeners: str = "", *, pump: str = "") -> Path:
    """The example organism (its workers import from the project root), plus extras."""
    path.write_text(
        f"organism:\n  name: hello\n{pump}listeners:{EXAMPLE_LISTENERS}{extra_listeners}\nprocess_pool:{EXAMPLE_POOL}"
    )
    return path


def raise_own_open_files(needed: int) -> None:
    """Let this test process hold ``needed`` descriptors, as many as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def closed_by_peer(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
