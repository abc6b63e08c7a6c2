"""The systemd notifier is silent without NOTIFY_SOCKET and honours WATCHDOG_PID."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from xml_pipeline.daemon.notify import SystemdNotifier


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = SystemdNotifier({})
    assert notifier.enabled is False
    assert notifier.watchdog_interval is None
    notifier.ready()  # no socket, no error
    notifier.stopping()


def test_watchdog_interval_is_half_the_period_and_only_for_our_pid(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    try:
        ours = SystemdNotifier(
            {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
        )
        assert ours.watchdog_interval == 15.0
        ours.ready(status="serving")
        assert receiver.recv(1024) == b"READY=1\nSTATUS=serving"
        ours.close()
        someone_elses = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
        assert someone_elses.watchdog_interval is None
        someone_elses.close()
    finally:
        receiver.close()


def test_a_vanished_notify_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    notifier.ready()
    notifier.close()
