"""Where the workers connect back to the pool: a Unix socket in a directory of the daemon's own.

The directory is created with mode 0700, so only processes of the daemon's
user can reach the socket; a connection is then taken for a worker only once
its first message carries the secret handed to the workers at spawn time. A
connection is kept here until it says who it is, then given to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable

from xml_pipeline.process_pool.channel import WorkerChannel
from xml_pipeline.process_pool.wire import TOKEN_BYTES, Hello

log = logging.getLogger("xml_pipeline.pool")


class WorkerDoor:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, backlog: int, admit: Callable[[WorkerChannel, Hello], None]
    ) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._loop = loop
        self._admit = admit
        self._directory = tempfile.mkdtemp(prefix="xp-pool-")
        self.address = os.path.join(self._directory, "workers.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(backlog)
        self._listener.setblocking(False)
        loop.add_reader(self._listener.fileno(), self._accept)
        self._greeting: set[WorkerChannel] = set()
        """Connections that have not yet said who they are."""

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("the worker pool's socket refused a connection: %s", exc)
                return
            sock.setblocking(False)
            self._greeting.add(WorkerChannel(self._loop, sock, self))

    def greeted(self, channel: WorkerChannel, hello: Hello | None) -> None:
        self._greeting.discard(channel)
        if hello is not None and secrets.compare_digest(hello.token, self.token):
            self._admit(channel, hello)
        else:
            log.warning("the worker pool's socket closed a connection that did not greet as a worker")
            channel.close()

    def answered(self, channel: WorkerChannel) -> None:
        """Nothing to answer before the greeting: the pool has sent nothing yet."""

    def closed(self, channel: WorkerChannel, held_calls: bool) -> None:
        self._greeting.discard(channel)

    def close(self) -> None:
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        for channel in list(self._greeting):
            channel.close()
        shutil.rmtree(self._directory, ignore_errors=True)
