"""The real daemon under a stand-in for systemd's notify socket.

The test binds an AF_UNIX datagram socket, starts `facenet-agent run` with
NOTIFY_SOCKET and WATCHDOG_USEC pointing at it, as systemd does for a
Type=notify unit with WatchdogSec=, and reads what the agent sends while it
recognises a video on the real models and publishes to a real mosquitto. It
then sends SIGHUP and SIGTERM, as `systemctl reload` and `systemctl stop` would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.broker import MosquittoBroker

DEVICE_ID = "notify-01"
WATCHDOG_USEC = 2_000_000
DRAIN_TIMEOUT_S = 4.0
# Seconds for loading and warming the models on a loaded 2-core machine.
STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Notification:
    received_at: float  # time.monotonic()
    fields: dict[str, str]


class NotifyListener:
    """A datagram socket that records every notification, as systemd's would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.settimeout(0.2)
        self._notifications: list[Notification] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    @property
    def notifications(self) -> list[Notification]:
        with self._changed:
            return list(self._notifications)

    def wait_for(self, key: str, value: str, count: int = 1,
                 timeout_s: float = 30.0) -> list[Notification]:
        """Block until `count` notifications set `key` to `value`; return all so far."""
        def enough() -> bool:
            return sum(n.fields.get(key) == value for n in self._notifications) >= count

        with self._changed:
            if not self._changed.wait_for(enough, timeout_s):
                raise AssertionError(f"fewer than {count} {key}={value} within {timeout_s} s; "
                                     f"got {[n.fields for n in self._notifications]}")
            return list(self._notifications)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                datagram = self._socket.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in datagram.decode().split("\n") if line)
            with self._changed:
                self._notifications.append(Notification(time.monotonic(), fields))
                self._changed.notify_all()


def write_face_video(photo: Path, path: Path, frames: int) -> None:
    import cv2

    image = cv2.resize(cv2.imread(str(photo)), (320, 240))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (320, 240))
    for _ in range(frames):
        writer.write(image)
    writer.release()


def indexes(notifications: list[Notification], key: str, value: str) -> list[int]:
    return [i for i, n in enumerate(notifications) if n.fields.get(key) == value]


@pytest.fixture
def running_agent(tmp_path: Path, mqtt_broker: MosquittoBroker, model_dir: Path,
                  example_data: Path):
    photo = sorted((example_data / "val" / "madonna").glob("*.jpg"))[0]
    video = tmp_path / "faces.avi"
    # Long enough that the source does not end during the test, even on a fast machine.
    write_face_video(photo, video, frames=1500)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": DEVICE_ID,
        "models": {"dir": str(model_dir)},
        "source": {"uri": str(video)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "runtime": {"cache_dir": str(tmp_path / "cache")},
        "service": {"drain_timeout_s": DRAIN_TIMEOUT_S},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port},
    }))
    listener = NotifyListener(tmp_path / "notify.sock")
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    environment.update(NOTIFY_SOCKET=str(listener.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                   env=environment, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        yield process, listener, config, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        listener.close()


def test_ready_watchdog_stopping_in_order(running_agent, mqtt_broker: MosquittoBroker) -> None:
    process, listener, config, log_path = running_agent

    listener.wait_for("READY", "1", timeout_s=STARTUP_TIMEOUT_S)
    listener.wait_for("WATCHDOG", "1", count=3)
    online = subprocess.run([sys.executable, "-m", "agent", "wait-online", "--config",
                             str(config), "--timeout", "30"],
                            capture_output=True, text=True, timeout=60, check=False)
    process.send_signal(signal.SIGTERM)
    stopped = listener.wait_for("STOPPING", "1")
    exit_status = process.wait(timeout=60)

    ready = indexes(stopped, "READY", "1")
    watchdog = indexes(stopped, "WATCHDOG", "1")
    stopping = indexes(stopped, "STOPPING", "1")
    assert exit_status == 0, log_path.read_text()[-4000:]
    assert len(ready) == 1
    assert len(stopping) == 1
    assert ready[0] <= watchdog[0], "a watchdog ping came before READY=1"
    assert len([i for i in watchdog if ready[0] < i < stopping[0]]) >= 2
    assert stopping[0] > ready[0]
    assert stopped[stopping[0]].fields["EXTEND_TIMEOUT_USEC"] == str(
        int((DRAIN_TIMEOUT_S + 15.0) * 1_000_000))
    assert all("STATUS" in stopped[i].fields for i in ready + stopping)
    assert online.returncode == 0, online.stdout + online.stderr
    assert f"{DEVICE_ID} reports online" in online.stdout


def test_watchdog_pings_paced(running_agent) -> None:
    process, listener, _, _ = running_agent

    listener.wait_for("READY", "1", timeout_s=STARTUP_TIMEOUT_S)
    received = listener.wait_for("WATCHDOG", "1", count=5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)

    pings = [n.received_at for n in received if n.fields.get("WATCHDOG") == "1"]
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:], strict=False)]
    # A quarter of the 2 s interval apart at the least, and always within the
    # interval, or systemd would kill the agent.
    assert min(gaps) >= 0.45
    assert max(gaps) < WATCHDOG_USEC / 1_000_000


def test_sighup_reloads_then_ready(running_agent) -> None:
    process, listener, _, log_path = running_agent

    listener.wait_for("READY", "1", timeout_s=STARTUP_TIMEOUT_S)
    process.send_signal(signal.SIGHUP)
    listener.wait_for("RELOADING", "1")
    reloaded = listener.wait_for("READY", "1", count=2, timeout_s=STARTUP_TIMEOUT_S)
    process.send_signal(signal.SIGTERM)
    exit_status = process.wait(timeout=60)

    reloading = indexes(reloaded, "RELOADING", "1")
    ready = indexes(reloaded, "READY", "1")
    assert exit_status == 0, log_path.read_text()[-4000:]
    assert ready[0] < reloading[0] < ready[1]
    assert int(reloaded[reloading[0]].fields["MONOTONIC_USEC"]) > 0
    assert reloaded[reloading[0]].fields["STATUS"].startswith("draining")
