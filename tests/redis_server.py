"""A real redis-server on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """redis-server on 127.0.0.1, without persistence; restartable on the same port."""

    def __init__(
        self,
        password: str | None = None,
        *,
        tls: bool = False,
        persistent: bool = False,
        launcher: Sequence[str] = (),
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it (Debian package redis-server)")
        self.binary = binary
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.persistent = persistent
        """AOF on, fsync on every write: a restart keeps everything acknowledged."""
        self.launcher = list(launcher)
        """A command the server runs under (a profiler, say), its own arguments included."""
        self.directory = Path(tempfile.mkdtemp(prefix="xp-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        if tls:
            self._make_certificate()

    @property
    def certificate(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{credentials}127.0.0.1:{self.port}/0?ssl_ca_certs={self.certificate}"
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1, which the client trusts as its CA."""
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        command += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        command += ["-keyout", str(self.directory / "key.pem"), "-out", str(self.certificate)]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def _arguments(self) -> list[str]:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        arguments = [*self.launcher, self.binary, "--bind", "127.0.0.1", "--save", "", *aof]
        arguments += ["--dir", str(self.directory), "--protected-mode", "yes"]
        if self.tls:
            arguments += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            arguments += ["--tls-cert-file", str(self.certificate), "--tls-key-file", str(self.directory / "key.pem")]
            arguments += ["--tls-ca-cert-file", str(self.certificate)]
        else:
            arguments += ["--port", str(self.port)]
        if self.password:
            arguments += ["--requirepass", self.password]
        return arguments

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(self._arguments(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.02)  # the server is starting; there is nothing else to wait on
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
