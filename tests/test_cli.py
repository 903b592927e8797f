"""The command line: clear one-line errors for the mistakes operators make at start."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_check_config_accepts_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: gate-01\nmqtt: {port: 1884}\n")

    result = agent_cli("check-config", str(config))

    assert result.returncode == 0
    assert "valid" in result.stdout


def test_check_config_names_bad_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: gate-01\nmqtt: {port: 99999}\n")

    result = agent_cli("check-config", str(config))

    assert result.returncode == 2
    assert "mqtt.port: must be at most 65535, got 99999" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_model_stops_start(tmp_path: Path, model_dir: Path, example_data: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    onet = models / "onet.onnx"
    data = bytearray(onet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onet.write_bytes(bytes(data))
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "gate-01",
        "models": {"dir": str(models)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
    }))

    result = agent_cli("enroll", str(example_data / "train"), "--config", str(config))

    assert result.returncode == 2
    assert "onet.onnx" in result.stderr
    assert "sha256" in result.stderr
    assert "Traceback" not in result.stderr
