"""Gallery sync end to end: enrol train/ on the server, sync a device, run val/, read sightings.

Each step is a separate process started through the console entry point:
`server keygen`, `server enroll`, `server publish`, `server run` (publisher and
collector), and the agent's `run` with sync.group set. A real Mosquitto on
loopback carries the gallery and the events; the real models embed the example
photos. The checks read the server's SQLite store directly.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.broker import MosquittoBroker

GROUP = "lobby"
DEVICE_ID = "gate-07"
PEOPLE = {"ben_afflek", "elton_john", "jerry_seinfeld", "madonna", "mindy_kaling"}


def agent_cli(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def read_sightings(store: Path) -> list[dict]:
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT device_id, identity_id, name, gallery_version, payload "
                          "FROM sightings").fetchall()
    return [{"device_id": device, "identity_id": identity, "name": name,
             "gallery_version": version, "event": json.loads(payload)}
            for device, identity, name, version, payload in rows]


def largest_face(sightings: list[dict]) -> dict:
    def area(sighting: dict) -> float:
        x1, y1, x2, y2 = sighting["event"]["bbox"]
        return (x2 - x1) * (y2 - y1)
    return max(sightings, key=area)


@pytest.fixture
def server_config(tmp_path: Path, mqtt_broker: MosquittoBroker, model_dir: Path) -> Path:
    keys = tmp_path / "keys"
    result = agent_cli("server", "keygen", "--out", str(keys))
    assert result.returncode == 0, result.stderr
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({
        "server_id": "central-1",
        "store": {"path": str(tmp_path / "server.db")},
        "signing": {"private_key_file": str(keys / "server.key")},
        "publish": {"groups": [GROUP], "poll_interval_s": 0.5},
        "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port},
        "models": {"dir": str(model_dir)},
    }))
    return config


def test_server_gallery_names_val_faces(tmp_path: Path, mqtt_broker: MosquittoBroker,
                                        model_dir: Path, example_data: Path,
                                        server_config: Path) -> None:
    enrolled = agent_cli("server", "enroll", str(example_data / "train"),
                         "--config", str(server_config), "--group", GROUP)
    assert enrolled.returncode == 0, enrolled.stderr[-3000:]
    assert {line.split(":")[0] for line in enrolled.stdout.splitlines()} >= PEOPLE

    published = agent_cli("server", "publish", "--config", str(server_config), "--group", GROUP)
    assert published.returncode == 0, published.stderr[-3000:]
    assert f"group {GROUP}: version 1" in published.stdout

    server_log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "agent", "server", "run",
                               "--config", str(server_config)],
                              stdout=server_log, stderr=subprocess.STDOUT)
    try:
        agent_config = tmp_path / "agent.yaml"
        agent_config.write_text(yaml.safe_dump({
            "device_id": DEVICE_ID,
            "models": {"dir": str(model_dir)},
            "gallery": {"path": str(tmp_path / "gallery.db")},
            "source": {"uri": str(example_data / "val")},
            "mqtt": {"host": mqtt_broker.host, "port": mqtt_broker.port},
            "outbox": {"path": str(tmp_path / "outbox.db")},
            "events": {"mode": "frame"},
            "sync": {"group": GROUP,
                     "public_key": (tmp_path / "keys" / "server.pub").read_text().strip(),
                     "first_sync_wait_s": 60},
        }))
        ran = agent_cli("run", "--config", str(agent_config))
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert "applied snapshot 1 of group lobby" in ran.stderr

        photos = sorted((example_data / "val").glob("*/*.jpg"))
        deadline = time.monotonic() + 30
        while True:
            sightings = read_sightings(tmp_path / "server.db")
            sources = {s["event"]["source"] for s in sightings}
            if sources >= {str(p) for p in photos} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGTERM)
        server_code = server.wait(60)
        server_log.close()
    server_output = (tmp_path / "server.log").read_text()

    assert server_code == 0, server_output[-3000:]
    assert "Traceback" not in server_output
    assert len(photos) == 25
    assert all(s["device_id"] == DEVICE_ID for s in sightings)
    assert all(s["gallery_version"] == 1 for s in sightings)
    correct = []
    for photo in photos:
        of_photo = [s for s in sightings if s["event"]["source"] == str(photo)]
        assert of_photo, f"no sighting stored for {photo}"
        if largest_face(of_photo)["name"] == photo.parent.name:
            correct.append(photo.name)
    assert len(correct) >= 24, f"only {len(correct)} of 25 named right: {sorted(correct)}"
