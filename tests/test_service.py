"""The agent process under its signals, with real models and a real mosquitto.

One agent runs over a video of one enrolled person and goes through a whole
life: it boots while the broker is down, confirms the person once the broker is
back, sends heartbeats and serves metrics, rejects an invalid config on SIGHUP,
reloads a valid one, and on SIGTERM drains within its deadline, publishing the
departure of the open appearance and the offline status.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from agent.config import ConfigError, parse_config
from agent.health import RunStats, start_metrics_server
from agent.pipeline import build_pipeline
from agent.service import _END_OF_SOURCE, _NO_FRAME, FrameQueue
from agent.sources import Frame
from tests.broker import MosquittoBroker, find_mosquitto, free_port
from tests.conftest_mqtt import MOSQUITTO_MISSING
from tests.test_end_to_end import enroll

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE_ID = "gate-01"
PERSON = "elton_john"
HEARTBEAT_KEYS = {
    "device_id", "agent_version", "model_id", "gallery_version", "runtime", "queue_depth",
    "faces_per_second", "dropped", "frames_dropped", "inflight", "mqtt_connected",
}


def make_video(photo: Path, path: Path, frames: int) -> Path:
    """Write `frames` copies of `photo`, each shifted by a pixel, as an MJPG AVI file."""
    image = cv2.imread(str(photo))
    height, width = image.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    assert writer.isOpened()
    for index in range(frames):
        writer.write(np.roll(image, index % 5, axis=1))
    writer.release()
    return path


class AgentProcess:
    """`python -m agent run`, with its log lines collected as they come."""

    def __init__(self, config: Path) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip())
                self._changed.notify_all()

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.lines)

    def wait_for_log(self, text: str, times: int = 1, timeout_s: float = 60.0) -> None:
        with self._changed:
            if not self._changed.wait_for(
                lambda: sum(text in line for line in self.lines) >= times
                or self.process.poll() is not None, timeout_s,
            ) or sum(text in line for line in self.lines) < times:
                raise AssertionError(f"no log line {text!r} (x{times}) within {timeout_s} s; "
                                     f"last lines:\n" + "\n".join(self.lines[-30:]))


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def payloads(messages: list[Any], suffix: str) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in messages if m.topic.endswith(suffix)]


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Any:
    executable = find_mosquitto()
    if executable is None:
        pytest.skip(MOSQUITTO_MISSING)
    broker = MosquittoBroker(tmp_path / "mosquitto", executable=executable, persistence=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def test_agent_lifecycle_with_signals(tmp_path: Path, persistent_broker: MosquittoBroker,
                                      model_dir: Path, example_data: Path) -> None:
    broker = persistent_broker
    photo = sorted((example_data / "val" / PERSON).glob("*.jpg"))[0]
    video = make_video(photo, tmp_path / "door.avi", frames=2000)
    metrics_port = free_port()
    settings: dict[str, Any] = {
        "device_id": DEVICE_ID,
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "source": {"uri": str(video)},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "reconnect_min_delay_s": 0.05,
                 "reconnect_max_delay_s": 0.5},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "events": {"mode": "appearance", "confirm_frames": 2, "confirm_window": 3},
        "health": {"heartbeat_interval_s": 0.3, "prometheus_port": metrics_port},
        "service": {"drain_timeout_s": 5.0},
    }
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(settings))
    train = tmp_path / "train"
    shutil.copytree(example_data / "train" / PERSON, train / PERSON)
    enroll(config, train)

    backend = broker.subscriber(f"facenet/{DEVICE_ID}/#", client_id="test-backend",
                                clean_session=False)
    broker.stop()
    agent = AgentProcess(config)
    try:
        # Boot with the broker down: the agent runs and keeps retrying.
        agent.wait_for_log(f"agent {DEVICE_ID} started")
        agent.wait_for_log("connection attempt 1 ")
        agent.wait_for_log("stored: appearance", timeout_s=60.0)
        assert agent.process.poll() is None
        broker.start()

        assert wait_until(lambda: payloads(backend.messages, "/events/appearance"), 30.0)
        confirmed = payloads(backend.messages, "/events/appearance")[0]
        assert confirmed["phase"] == "confirmed"
        assert confirmed["identity"] == {"id": PERSON, "name": PERSON, "known": True}
        assert confirmed["best_distance"] < confirmed["threshold"]
        assert confirmed["first_seen"] <= confirmed["capture_time"]

        assert wait_until(lambda: payloads(backend.messages, "/heartbeat"), 10.0)
        heartbeat = payloads(backend.messages, "/heartbeat")[-1]
        assert HEARTBEAT_KEYS <= set(heartbeat)
        assert heartbeat["device_id"] == DEVICE_ID
        assert heartbeat["gallery_version"] == 1
        assert heartbeat["runtime"]["batch_size"] >= 1
        assert heartbeat["runtime"]["name"] == "onnxruntime"
        assert heartbeat["runtime"]["precision"] == "fp32"

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as response:
            metrics = response.read().decode()
        assert 'facenet_agent_outbox_depth{device_id="gate-01"}' in metrics
        assert "facenet_agent_frames_total" in metrics

        # SIGHUP with an invalid file keeps the running config.
        config.write_text("device_id: gate-01\nmqtt: {port: not-a-port}\n")
        agent.process.send_signal(signal.SIGHUP)
        agent.wait_for_log("reload rejected, keeping the running config")
        assert agent.process.poll() is None

        # SIGHUP with a valid file whose models folder is empty keeps the running
        # config too, because the running pipeline would stop before the new one loads.
        empty_models = tmp_path / "no-models"
        empty_models.mkdir()
        config.write_text(yaml.safe_dump({**settings, "models": {"dir": str(empty_models)}}))
        agent.process.send_signal(signal.SIGHUP)
        agent.wait_for_log("reload rejected, keeping the running config", times=2)
        assert agent.count("manifest.json") >= 1
        assert agent.process.poll() is None

        # SIGHUP with a valid file restarts the pipeline on it.
        settings["health"]["heartbeat_interval_s"] = 0.2
        config.write_text(yaml.safe_dump(settings))
        agent.process.send_signal(signal.SIGHUP)
        agent.wait_for_log(f"agent {DEVICE_ID} started", times=2)
        agent.wait_for_log("heartbeat: every 0.2 s")

        agent.wait_for_log("stored: appearance", times=3, timeout_s=60.0)
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        code = agent.process.wait(timeout=30.0)
        stop_time = time.monotonic() - started
    finally:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()

    assert code == 0, "\n".join(agent.lines[-30:])
    assert stop_time < 5.0 + 5.0
    assert agent.count(f"agent {DEVICE_ID}: stop requested; waiting up to 5 s") == 1
    # The open appearance was flushed as left and delivered before the exit.
    assert wait_until(lambda: any(e["phase"] == "left" for e in
                                  payloads(backend.messages, "/events/appearance")), 10.0)
    status = broker.subscriber(f"facenet/{DEVICE_ID}/status").wait_for(1)[0]
    assert json.loads(status.payload)["state"] == "offline"
    assert status.retain


def test_frame_queue_drops_oldest_and_counts() -> None:
    stats = RunStats()
    queue = FrameQueue(2, drop_oldest=True, stats=stats)
    frames = [Frame(f"cam#{i}", i, 0.0) for i in range(5)]

    for frame in frames:
        assert queue.put(frame)

    assert stats.frames_dropped == 3
    assert queue.get(0.1) is frames[3]
    assert queue.get(0.1) is frames[4]
    assert queue.get(0.01) is _NO_FRAME


def test_frame_queue_blocks_file_source_until_closed() -> None:
    stats = RunStats()
    queue = FrameQueue(1, drop_oldest=False, stats=stats)
    queue.put(Frame("a.jpg", 0, 0.0))
    results: list[bool] = []
    producer = threading.Thread(target=lambda: results.append(queue.put(Frame("b.jpg", 1, 0.0))))
    producer.start()
    time.sleep(0.1)
    assert producer.is_alive()

    queue.close()
    producer.join(1.0)

    assert results == [False]
    assert stats.frames_dropped == 0


def test_frame_queue_end_marker_never_dropped() -> None:
    stats = RunStats()
    queue = FrameQueue(1, drop_oldest=True, stats=stats)
    queue.put(Frame("cam#0", 0, 0.0))
    done = threading.Thread(target=queue.put, args=(_END_OF_SOURCE,))
    done.start()
    time.sleep(0.05)

    assert isinstance(queue.get(0.1), Frame)
    done.join(1.0)
    assert queue.get(0.1) is _END_OF_SOURCE
    assert stats.frames_dropped == 0


def test_pipeline_records_precision_in_use(tmp_path: Path, model_dir: Path) -> None:
    config = parse_config({
        "device_id": "gate-01",
        "models": {"dir": str(model_dir)},
        "runtime": {"name": "onnxruntime", "precision": "int8", "batch_size": 2},
        "gallery": {"path": str(tmp_path / "gallery.db")},
    })

    pipeline = build_pipeline(config)
    try:
        session = pipeline.embedder.session
        assert session.runtime == "onnxruntime"
        assert session.precision == "int8"
        assert pipeline.embedder.batch_size == 2
        assert pipeline.detector.pnet.precision == "fp32"
    finally:
        pipeline.gallery.close()


def test_metrics_port_in_use_is_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        with pytest.raises(ConfigError, match=f"health.prometheus_port: .*127.0.0.1:{port}"):
            start_metrics_server("127.0.0.1", port, dict)
