"""Where the daemon listens by default, and where clients look for it."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_directory() -> Path:
    """systemd's RuntimeDirectory, else $XDG_RUNTIME_DIR/xml-pipeline, else a per-user /tmp folder."""
    systemd_dirs = os.environ.get("RUNTIME_DIRECTORY")
    if systemd_dirs:
        return Path(systemd_dirs.split(":")[0])
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "xml-pipeline"
    return Path("/tmp") / f"xml-pipeline-{os.getuid()}"


def default_socket_path(organism_name: str) -> Path:
    return runtime_directory() / f"{organism_name}.sock"
