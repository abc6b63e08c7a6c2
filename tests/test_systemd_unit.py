"""systemd/xml-pipeline.service: systemd accepts it, and it says what the daemon needs."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "xml-pipeline.service"
INSTALLED_BINARY = "/opt/xml-pipeline/.venv/bin/xml-pipeline"


def unit_sections() -> dict[str, dict[str, list[str]]]:
    """Each section's keys with every value given (systemd allows repeats, e.g. After=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_unit_declares_notify_watchdog_reload_restart_and_hardening() -> None:
    unit = unit_sections()
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert int(service["WatchdogSec"][0]) > 0
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["ExecStart"][0].endswith("xml-pipeline run /etc/xml-pipeline/organism.yaml")
    assert "check" in service["ExecStartPre"][0]
    assert service["RuntimeDirectory"] == ["xml-pipeline"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert service[key] == [value], key
    after = " ".join(unit["Unit"]["After"]).split()
    assert "redis-server.service" in after
    assert "network.target" in after
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    configparser.ConfigParser(strict=False).read_string(UNIT.read_text())  # plain INI, nothing exotic


def test_open_file_limit_is_raised_for_many_connections() -> None:
    service = unit_sections()["Service"]
    assert int(service["LimitNOFILE"][0]) >= 65536


def test_stop_timeout_leaves_room_for_the_drain() -> None:
    service = unit_sections()["Service"]
    assert int(service["TimeoutStopSec"][0]) > 20 + 5  # drain_timeout_seconds default + reply grace


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here; the key checks above still run")
    binary = Path(sys.executable).with_name("xml-pipeline")
    unit = tmp_path / "xml-pipeline.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "xml-pipeline.service" not in result.stderr, result.stderr
