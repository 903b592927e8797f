"""The command line: clear one-line errors for the mistakes operators make at start."""

from __future__ import annotations

import json
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


def test_check_config_reports_missing_password_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: gate-01\nmqtt: {{username: u, password_file: {tmp_path}/pw}}\n")

    result = agent_cli("check-config", str(config))

    assert result.returncode == 2
    assert "mqtt.password_file: cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_billion_laughs_fails_fast(tmp_path: Path) -> None:
    levels = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for name, previous in zip("bcdefghi", "abcdefgh", strict=True):
        levels.append(f"&{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: [" + ", ".join(levels) + "]\n")

    result = subprocess.run([sys.executable, "-m", "agent", "check-config", str(config)],
                            capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 2
    assert "aliases" in result.stderr


def test_enroll_missing_folder_fails_before_models(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    # The models folder does not exist, so reaching the model load would fail
    # with a different message.
    config.write_text(f"device_id: gate-01\nmodels: {{dir: {tmp_path}/no-models}}\n"
                      f"gallery: {{path: {tmp_path}/gallery.db}}\n")

    missing = agent_cli("enroll", str(tmp_path / "absent"), "--config", str(config))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    flat = agent_cli("enroll", str(tmp_path / "flat"), "--config", str(config))

    assert missing.returncode == 2
    assert "is not a folder" in missing.stderr
    assert flat.returncode == 2
    assert "has no sub-folders" in flat.stderr
    assert "Traceback" not in missing.stderr + flat.stderr


def test_truncated_model_without_verify_named(tmp_path: Path, model_dir: Path,
                                              example_data: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    onet = models / "onet.onnx"
    onet.write_bytes(onet.read_bytes()[:1000])
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "gate-01",
        "models": {"dir": str(models), "verify_sha256": False},
        "runtime": {"name": "onnxruntime", "precision": "fp32", "batch_size": 1},
        "gallery": {"path": str(tmp_path / "gallery.db")},
    }))

    result = agent_cli("enroll", str(example_data / "train"), "--config", str(config))

    assert result.returncode == 2
    assert "onet.onnx" in result.stderr
    assert "truncated or damaged" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_damaged_outbox_exits_2(tmp_path: Path, model_dir: Path,
                                         example_data: Path) -> None:
    outbox = tmp_path / "outbox.db"
    outbox.write_bytes(b"not an SQLite file\n" * 100)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "gate-01",
        "models": {"dir": str(model_dir)},
        "runtime": {"name": "onnxruntime", "precision": "fp32", "batch_size": 1},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "outbox": {"path": str(outbox)},
        "source": {"uri": str(example_data / "val")},
        "mqtt": {"host": "127.0.0.1", "port": 1},
    }))

    result = agent_cli("run", "--config", str(config))

    assert result.returncode == 2
    assert f"outbox {outbox}" in result.stderr
    assert "Traceback" not in result.stderr


def test_enroll_name_clash_rejected_before_loading(tmp_path: Path) -> None:
    people = tmp_path / "people"
    (people / "Anna Maria").mkdir(parents=True)
    (people / "anna-maria").mkdir()
    config = tmp_path / "agent.yaml"
    # The models folder does not exist: the clash must be reported before loading.
    config.write_text(yaml.safe_dump({
        "device_id": "gate-01",
        "models": {"dir": str(tmp_path / "no-models")},
        "gallery": {"path": str(tmp_path / "gallery.db")},
    }))

    result = agent_cli("enroll", str(people), "--config", str(config))

    assert result.returncode == 2
    assert "Anna Maria" in result.stderr
    assert "anna-maria" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "gallery.db").exists()


def test_bench_pipeline_needs_input_folder(tmp_path: Path) -> None:
    result = agent_cli("bench", "pipeline", "--out", str(tmp_path / "out"),
                       "--input", str(tmp_path / "missing"))

    assert result.returncode == 2
    assert "bench pipeline needs --input, a folder of images" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_pipeline_rejects_bad_frame_size(tmp_path: Path) -> None:
    result = agent_cli("bench", "pipeline", "--out", str(tmp_path / "out"),
                       "--input", str(tmp_path), "--frame-size", "640by480")

    assert result.returncode == 2
    assert "invalid --frame-size '640by480': expected WIDTHxHEIGHT" in result.stderr


def test_bench_pipeline_writes_reports(tmp_path: Path, model_dir: Path,
                                       example_data: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(example_data / "val" / "madonna", photos / "madonna")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "bench-01",
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "runtime": {"name": "onnxruntime", "cache_dir": str(tmp_path / "cache")},
    }))

    result = agent_cli("bench", "pipeline", "--config", str(config), "--input", str(photos),
                       "--out", str(tmp_path / "out"), "--repeat", "1",
                       "--overload-fps", "50", "--overload-seconds", "2")

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    photo_count = len(list(photos.glob("*/*")))
    assert report["throughput"]["images"] == photo_count
    assert report["throughput"]["errors"] == 0
    # Each of these photos shows her face, so each has at least one.
    assert report["throughput"]["faces"] >= photo_count
    overload = report["overload"]
    assert overload["frames_processed"] + overload["frames_dropped"] == \
        overload["frames_offered"]
    assert (tmp_path / "out" / "pipeline.md").read_text().startswith("# Pipeline benchmark")
