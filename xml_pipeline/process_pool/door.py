"""Where the workers connect back to the pool: a Unix socket only the daemon's own user may use.

On Linux the socket is in the abstract namespace: it has no file, so nothing
is left behind when the daemon is killed outright. A connection from a process
of another user is closed at once (SO_PEERCRED). Elsewhere the socket is a
file in a directory of mode 0700, removed when the pool closes. Either way a
connection is taken for a worker only once its first message carries the
secret handed to the workers at spawn time; it is kept here until it says who
it is, then given to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import struct
import sys
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
        self._directory: str | None = None
        if ABSTRACT_SOCKETS:
            self.address = f"\0xp-pool-{os.getpid()}-{secrets.token_hex(8)}"
        else:
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
            if not _same_user(sock):
                log.warning("the worker pool's socket closed a connection from another user")
                sock.close()
                continue
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
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


ABSTRACT_SOCKETS = sys.platform == "linux"

_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _same_user(sock: socket.socket) -> bool:
    """Whether the peer runs as this process's user (always, where the socket is a file in a 0700 directory)."""
    if not ABSTRACT_SOCKETS:
        return True
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    _, uid, _ = _PEER_CREDENTIALS.unpack(credentials)
    return bool(uid == os.getuid())
