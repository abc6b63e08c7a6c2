"""Helper processes die with the daemon that started them.

A worker of a ProcessPoolExecutor holds its own end of the task pipe, so when
its parent is killed outright (SIGKILL, the OOM killer) it never sees the pipe
close and waits forever. A small thread in each helper process notices the
parent is gone and exits. Under systemd, KillMode=mixed would clean them up
too; elsewhere, this is what does.
"""

from __future__ import annotations

import os
import threading

CHECK_SECONDS = 0.5


def exit_with_parent(parent_pid: int) -> None:
    """Start watching: when ``parent_pid`` is no longer our parent, exit at once."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            threading.Event().wait(CHECK_SECONDS)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
