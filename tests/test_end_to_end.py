"""End to end: enrol the example train photos, run the agent over val, read events off the broker.

Everything is real: the ONNX models built from the public weights, the example
photos, a Mosquitto broker on loopback, the SQLite gallery, and the agent
started as a separate process through its console entry point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.broker import MosquittoBroker, ReceivedMessage

DEVICE_ID = "gate-01"
EVENT_TOPIC = f"facenet/{DEVICE_ID}/events/identity"
EVENT_KEYS = {
    "schema_version", "event_id", "device_id", "source", "frame_index", "capture_time",
    "identity", "distance", "threshold", "metric", "bbox", "detection_score", "model_id",
    "gallery_version",
}


def write_config(path: Path, model_dir: Path, gallery: Path, source: Path, port: int) -> Path:
    config = {
        "device_id": DEVICE_ID,
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(gallery)},
        "source": {"uri": str(source)},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "outbox": {"path": str(path.with_suffix(".outbox.db"))},
        # events.mode stays at its default, auto, which gives one event per face
        # for a folder of photos: the behaviour these tests check.
    }
    path.write_text(yaml.safe_dump(config))
    return path


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True, text=True, timeout=900, check=False,
    )


def enroll(config: Path, folder: Path) -> None:
    result = agent_cli("enroll", str(folder), "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]


def events_by_source(messages: list[ReceivedMessage]) -> dict[str, list[dict]]:
    events: dict[str, list[dict]] = {}
    for message in messages:
        event = json.loads(message.payload)
        events.setdefault(event["source"], []).append(event)
    return events


def main_face(events: list[dict]) -> dict:
    """Return the event of the largest face in a photo."""
    def area(event: dict) -> float:
        x1, y1, x2, y2 = event["bbox"]
        return (x2 - x1) * (y2 - y1)
    return max(events, key=area)


@pytest.fixture(scope="module")
def full_gallery(tmp_path_factory: pytest.TempPathFactory, model_dir: Path,
                 example_data: Path) -> Path:
    """A gallery with all five people of the train set enrolled, built once per module."""
    folder = tmp_path_factory.mktemp("full")
    gallery = folder / "gallery.db"
    config = write_config(folder / "agent.yaml", model_dir, gallery, example_data / "val", 1883)
    enroll(config, example_data / "train")
    return gallery


def test_val_photos_identified(tmp_path: Path, mqtt_broker: MosquittoBroker, model_dir: Path,
                               example_data: Path, full_gallery: Path) -> None:
    gallery = shutil.copy(full_gallery, tmp_path / "gallery.db")
    val = example_data / "val"
    photos = sorted(val.glob("*/*.jpg"))
    config = write_config(tmp_path / "agent.yaml", model_dir, Path(gallery), val,
                          mqtt_broker.port)
    subscriber = mqtt_broker.subscriber(f"facenet/{DEVICE_ID}/events/#")

    result = agent_cli("run", "--config", str(config))

    assert result.returncode == 0, result.stderr[-3000:]
    messages = subscriber.wait_for(len(photos), timeout=30)
    assert all(m.topic == EVENT_TOPIC for m in messages)
    assert all(m.qos == 1 for m in messages)
    assert not any(m.retain for m in messages)

    events = events_by_source(messages)
    assert len(photos) == 25
    correct = []
    for photo in photos:
        assert str(photo) in events, f"no event for {photo}"
        event = main_face(events[str(photo)])
        assert set(event) == EVENT_KEYS
        if event["identity"]["id"] == photo.parent.name:
            correct.append(photo.name)
    assert len(correct) >= 24, f"only {len(correct)} of 25 identified: {sorted(correct)}"


def test_event_fields_are_complete(tmp_path: Path, mqtt_broker: MosquittoBroker,
                                   model_dir: Path, example_data: Path,
                                   full_gallery: Path) -> None:
    source = tmp_path / "one"
    source.mkdir()
    photo = sorted((example_data / "val" / "madonna").glob("*.jpg"))[0]
    shutil.copy(photo, source / photo.name)
    gallery = shutil.copy(full_gallery, tmp_path / "gallery.db")
    config = write_config(tmp_path / "agent.yaml", model_dir, Path(gallery), source,
                          mqtt_broker.port)
    subscriber = mqtt_broker.subscriber(EVENT_TOPIC)
    manifest = json.loads((model_dir / "manifest.json").read_text())

    result = agent_cli("run", "--config", str(config))

    assert result.returncode == 0, result.stderr[-3000:]
    event = json.loads(subscriber.wait_for(1, timeout=30)[0].payload)
    assert event["schema_version"] == 1
    assert len(event["event_id"]) == 36
    assert event["device_id"] == DEVICE_ID
    assert event["source"] == str(source / photo.name)
    assert event["capture_time"].endswith("Z")
    assert event["identity"] == {"id": "madonna", "name": "madonna", "known": True}
    assert 0 <= event["distance"] < event["threshold"] == 1.1
    assert event["metric"] == "euclidean"
    assert event["model_id"] == manifest["model_id"]
    assert event["gallery_version"] == 5  # one version per enrolled identity
    assert 0.9 <= event["detection_score"] <= 1.0
    x1, y1, x2, y2 = event["bbox"]
    assert 0 <= x1 < x2 and 0 <= y1 < y2


def test_person_not_enrolled_is_unknown(tmp_path: Path, mqtt_broker: MosquittoBroker,
                                        model_dir: Path, example_data: Path) -> None:
    train = tmp_path / "train"
    for person in (example_data / "train").iterdir():
        if person.name != "madonna":
            shutil.copytree(person, train / person.name)
    config = write_config(tmp_path / "agent.yaml", model_dir, tmp_path / "gallery.db",
                          example_data / "val" / "madonna", mqtt_broker.port)
    enroll(config, train)
    photos = sorted((example_data / "val" / "madonna").glob("*.jpg"))
    subscriber = mqtt_broker.subscriber(EVENT_TOPIC)

    result = agent_cli("run", "--config", str(config))

    assert result.returncode == 0, result.stderr[-3000:]
    events = events_by_source(subscriber.wait_for(len(photos), timeout=30))
    for photo in photos:
        event = main_face(events[str(photo)])
        assert event["identity"] == {"id": None, "name": None, "known": False}, photo
        assert event["distance"] >= 1.1


def test_empty_gallery_reports_unknown(tmp_path: Path, mqtt_broker: MosquittoBroker,
                                       model_dir: Path, example_data: Path) -> None:
    source = tmp_path / "one"
    source.mkdir()
    photo = sorted((example_data / "val" / "elton_john").glob("*.jpg"))[0]
    shutil.copy(photo, source / photo.name)
    config = write_config(tmp_path / "agent.yaml", model_dir, tmp_path / "gallery.db", source,
                          mqtt_broker.port)
    subscriber = mqtt_broker.subscriber(EVENT_TOPIC)

    result = agent_cli("run", "--config", str(config))

    assert result.returncode == 0, result.stderr[-3000:]
    event = json.loads(subscriber.wait_for(1, timeout=30)[0].payload)
    assert event["identity"]["known"] is False
    assert event["distance"] is None
    assert event["gallery_version"] == 0
