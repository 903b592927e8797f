"""systemd/facenet-agent.service: systemd's own checks, and the settings the agent relies on.

The Ansible test runs `systemd-analyze verify` once more on the unit as
installed in a Debian root, where ExecStart's program exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT = REPO_ROOT / "systemd" / "facenet-agent.service"
EXEC_START = "/opt/facenet-agent/current/venv/bin/facenet-agent"
# systemd-analyze security rates a unit from 0 (locked down) to 10 (no hardening).
MAX_EXPOSURE = 3.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze not found; install the Debian package systemd")
    return found


def unit_settings() -> list[tuple[str, str, str]]:
    """Return (section, key, value) for every assignment in the unit, in order."""
    settings = []
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key, value))
    return settings


def values(section: str, key: str) -> list[str]:
    return [v for s, k, v in unit_settings() if s == section and k == key]


def copy_with_runnable_exec_start(tmp_path: Path) -> Path:
    """Copy the unit, pointing ExecStart at a program that exists on this machine."""
    text = UNIT.read_text()
    assert EXEC_START in text
    copy = tmp_path / "facenet-agent.service"
    copy.write_text(text.replace(EXEC_START, shutil.which("true") or "/bin/true"))
    return copy


def test_unit_passes_verify(tmp_path: Path) -> None:
    unit = copy_with_runnable_exec_start(tmp_path)

    result = subprocess.run([systemd_analyze(), "verify", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings, so the output must be empty.
    assert result.stderr == ""
    assert result.stdout == ""


def test_unit_exposure_is_low(tmp_path: Path) -> None:
    unit = copy_with_runnable_exec_start(tmp_path)

    result = subprocess.run([systemd_analyze(), "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for facenet-agent\.service: ([0-9.]+)",
                      result.stdout)
    assert match is not None, result.stdout[-2000:]
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_notify_and_watchdog() -> None:
    assert values("Service", "Type") == ["notify"]
    assert values("Service", "NotifyAccess") == ["main"]
    watchdog = values("Service", "WatchdogSec")
    assert len(watchdog) == 1
    assert int(watchdog[0]) > 0
    assert values("Service", "ExecStart") == [
        f"{EXEC_START} run --config /etc/facenet-agent/agent.yaml"
    ]


def test_unit_restart_and_ordering() -> None:
    assert values("Service", "Restart") == ["on-failure"]
    assert int(values("Service", "RestartSec")[0]) > 0
    assert values("Service", "RestartPreventExitStatus") == ["2"]
    assert values("Unit", "After") == ["network-online.target"]
    assert values("Unit", "Wants") == ["network-online.target"]
    assert values("Install", "WantedBy") == ["multi-user.target"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("User", "facenet-agent"),
        ("Group", "facenet-agent"),
        ("SupplementaryGroups", "video"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "facenet-agent"),
        ("CacheDirectory", "facenet-agent"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("PrivateDevices", "no"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "char-video4linux rw"),
        ("LoadCredential", "mqtt-password:/etc/facenet-agent/credentials/mqtt-password"),
        ("StandardError", "journal"),
    ],
)
def test_unit_hardening_setting(key: str, expected: str) -> None:
    assert values("Service", key) == [expected]


def test_unit_logs_unbuffered() -> None:
    environment = values("Service", "Environment")

    assert "PYTHONUNBUFFERED=1" in environment
    assert "PYTHONDONTWRITEBYTECODE=1" in environment
