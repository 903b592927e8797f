"""Operator-style attacks on the overlapping stages and on `bench pipeline`.

Real models, real example photos, a real Mosquitto on loopback and real SQLite
files. A folder that mixes good photos with broken and unusual files goes
through the agent under several stage settings, and the events the broker
delivers are checked against the same pipeline run one image at a time.
Bad command-line values of `bench pipeline` and an idle source with two
detect workers are covered too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from agent.bench_pipeline import load_inputs
from agent.cli import main as cli_main
from agent.config import parse_config
from agent.enroll import enroll_folder
from agent.images import read_image
from agent.pipeline import Pipeline, build_pipeline
from agent.service import run_agent
from agent.stages import StagedRecognizer
from agent.tuning_cli import parse_frame_size
from tests.broker import MosquittoBroker, free_port

DEVICE_ID = "stages-attack"
EVENT_TOPIC = f"facenet/{DEVICE_ID}/events/identity"
# Files of the mixed folder that the agent must skip, with a word of the reason it logs.
UNREADABLE = {
    "a02_truncated.jpg": "truncated",
    "a03_empty.jpg": "empty",
    "a04_jpeg_header_only.jpg": "truncated",
    "a10_text.jpg": "not a decodable image",
}


@pytest.fixture(scope="module")
def gallery(model_dir: Path, example_data: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gallery with three train photos of each of the five people."""
    folder = tmp_path_factory.mktemp("attack-gallery")
    people = folder / "people"
    for person in sorted((example_data / "train").iterdir()):
        (people / person.name).mkdir(parents=True)
        for photo in sorted(person.glob("*.jpg"))[:3]:
            shutil.copy(photo, people / person.name / photo.name)
    config = parse_config({
        "device_id": DEVICE_ID,
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(folder / "gallery.db")},
        "runtime": {"name": "onnxruntime", "cache_dir": str(folder / "cache")},
    })
    pipeline = build_pipeline(config)
    try:
        enroll_folder(pipeline, people)
    finally:
        pipeline.gallery.close()
    return folder / "gallery.db"


@pytest.fixture(scope="module")
def pipeline(model_dir: Path, gallery: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("attack-pipeline")
    copy = shutil.copy(gallery, folder / "gallery.db")
    config = parse_config({
        "device_id": DEVICE_ID,
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(copy)},
        "runtime": {"name": "onnxruntime", "cache_dir": str(folder / "cache")},
    })
    built = build_pipeline(config)
    yield built
    built.gallery.close()


@pytest.fixture(scope="module")
def mixed_folder(example_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good photos between truncated, empty, text, grayscale, 1x1, 8000x6000 and RGBA files."""
    folder = tmp_path_factory.mktemp("mixed")
    photos = sorted((example_data / "val").glob("*/*.jpg"))
    good = []
    for photo in photos[:7]:
        image = cv2.imread(str(photo))
        assert image is not None, photo
        good.append(image)

    shutil.copy(photos[0], folder / "a01_good.jpg")
    data = photos[1].read_bytes()
    (folder / "a02_truncated.jpg").write_bytes(data[:len(data) // 3])
    (folder / "a03_empty.jpg").write_bytes(b"")
    (folder / "a04_jpeg_header_only.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"junk" * 100)
    cv2.imwrite(str(folder / "a05_gray.jpg"), cv2.cvtColor(good[2], cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "a06_one_pixel.png"), np.zeros((1, 1, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "a07_huge.jpg"), cv2.resize(good[3], (8000, 6000)))
    rgba = cv2.cvtColor(good[4], cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 128
    cv2.imwrite(str(folder / "a08_alpha.png"), rgba)
    shutil.copy(photos[5], folder / "a09_good.jpg")
    (folder / "a10_text.jpg").write_text("not an image")
    shutil.copy(photos[6], folder / "a11_good_upper.JPG")
    return folder


@pytest.fixture(scope="module")
def expected_faces(pipeline: Pipeline, mixed_folder: Path) -> dict[str, int]:
    """Faces per readable file of the mixed folder, from the pipeline run one image at a time."""
    counts = {}
    for path in sorted(mixed_folder.iterdir()):
        if path.name not in UNREADABLE:
            counts[str(path)] = len(pipeline.recognize(read_image(path)))
    return counts


def agent_config(tmp_path: Path, model_dir: Path, gallery: Path, source: Path, port: int,
                 service: dict | None = None) -> dict:
    return {
        "device_id": DEVICE_ID,
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(shutil.copy(gallery, tmp_path / "gallery.db"))},
        "outbox": {"path": str(tmp_path / "outbox.db")},
        "source": {"uri": str(source)},
        "mqtt": {"host": "127.0.0.1", "port": port},
        "runtime": {"name": "onnxruntime", "cache_dir": str(tmp_path / "cache")},
        "service": service or {},
    }


@pytest.mark.parametrize("service", [
    {"detect_workers": 1},
    {"detect_workers": 4},
    {"max_frames_in_flight": 1},
    {"max_batch_wait_ms": 0},
    {"max_batch_wait_ms": 5000},
], ids=lambda service: "-".join(f"{key}={value}" for key, value in service.items()))
def test_mixed_folder_events_in_file_order(
        service: dict, tmp_path: Path, mqtt_broker: MosquittoBroker, model_dir: Path,
        gallery: Path, mixed_folder: Path, expected_faces: dict[str, int],
        caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO")
    config = parse_config(agent_config(tmp_path, model_dir, gallery, mixed_folder,
                                       mqtt_broker.port, service))
    subscriber = mqtt_broker.subscriber(EVENT_TOPIC)

    code = run_agent(config)

    assert code == 0
    stage_threads = [thread.name for thread in threading.enumerate()
                     if thread.name.startswith(("detect-", "embed", "capture"))]
    assert not stage_threads, "threads left running after run_agent returned"
    total = sum(expected_faces.values())
    messages = subscriber.wait_for(total, timeout=10)
    time.sleep(0.5)
    assert len(subscriber.messages) == total, "more events than faces"
    events = [json.loads(m.payload) for m in messages]
    sources = [event["source"] for event in events]
    assert sources == sorted(sources), "events left file order"
    for path, faces in expected_faces.items():
        assert sources.count(path) == faces, path

    log = caplog.text
    for name, reason in UNREADABLE.items():
        skipped = [line for line in log.splitlines()
                   if "skipped input" in line and name in line]
        assert skipped, f"{name} not logged as skipped"
        assert reason in skipped[0], skipped[0]
    assert f"{mixed_folder / 'a06_one_pixel.png'}: no face found" in log
    assert "Traceback" not in log
    assert "11 frames" in log
    assert "4 inputs skipped" in log


def test_sigterm_mid_folder_exits_clean(tmp_path: Path, mqtt_broker: MosquittoBroker,
                                        model_dir: Path, gallery: Path, example_data: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, photo in enumerate(sorted((example_data / "train").glob("*/*.jpg"))[:60]):
        shutil.copy(photo, folder / f"{index:03d}.jpg")
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump(agent_config(tmp_path, model_dir, gallery, folder,
                                                       mqtt_broker.port)))
    subscriber = mqtt_broker.subscriber(EVENT_TOPIC)
    log_path = tmp_path / "agent.log"

    with log_path.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                    str(config_path)], stdout=log_file, stderr=log_file)
        try:
            deadline = time.monotonic() + 60
            while "stored:" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    log = log_path.read_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log
    assert "received SIGTERM" in log
    assert "frames read but not processed at stop requested" in log
    stored = log.count(" stored: ")
    assert stored > 0
    messages = subscriber.wait_for(stored, timeout=10)
    assert len(messages) == stored
    assert "0 in outbox" in log


def test_idle_source_two_workers_no_stall(pipeline: Pipeline):
    def no_frames(timeout_s: float) -> object:
        time.sleep(timeout_s)
        return None

    stages = StagedRecognizer(pipeline, [pipeline.detector, pipeline.detector], no_frames,
                              max_batch_wait_s=0.05, max_in_flight=8)
    stages.start()
    try:
        time.sleep(2.5)
        stalled = stages.stalled_for()
        in_flight = stages.in_flight
    finally:
        stages.close()

    assert stalled < 1.0, f"idle source counted as a stall of {stalled:.1f} s"
    assert in_flight == 0, f"{in_flight} frames in flight while the source sent none"


class WatchdogPings:
    """A Lifecycle that counts watchdog pings and sets `stop` `seconds` after ready()."""

    def __init__(self, stop: threading.Event, seconds: float) -> None:
        self.count = 0
        self.timer = threading.Timer(seconds, stop.set)

    def ready(self, status: str) -> None:
        self.timer.start()

    def watchdog(self) -> None:
        self.count += 1

    def reloading(self, status: str) -> None:
        pass

    def stopping(self, status: str, timeout_s: float) -> None:
        pass


def test_unreachable_camera_keeps_watchdog(tmp_path: Path, mqtt_broker: MosquittoBroker,
                                           model_dir: Path, gallery: Path,
                                           caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO")
    # Nothing listens on this loopback port, so the source reconnects with back-off
    # and never delivers a frame.
    camera = f"http://127.0.0.1:{free_port()}/stream"
    config = parse_config(agent_config(tmp_path, model_dir, gallery, Path("unused"),
                                       mqtt_broker.port,
                                       {"detect_workers": 2, "stall_timeout_s": 1}))
    config = dataclasses.replace(config, source=dataclasses.replace(config.source, uri=camera))
    stop = threading.Event()
    pings = WatchdogPings(stop, 4.0)

    try:
        code = run_agent(config, stop, pings)
    finally:
        pings.timer.cancel()

    assert code == 0
    assert "no recognition progress" not in caplog.text
    assert pings.count >= 3, f"only {pings.count} watchdog pings in 4 s"


def bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "bench", "pipeline", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_bench_empty_folder_exits_2(tmp_path: Path, model_dir: Path):
    empty = tmp_path / "empty"
    empty.mkdir()

    result = bench_cli("--input", str(empty), "--out", str(tmp_path / "out"),
                       "--models", str(model_dir), "--overload-fps", "0")

    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2


def test_bench_inputs_skip_corrupt_image(tmp_path: Path, mixed_folder: Path):
    shutil.copy(mixed_folder / "a01_good.jpg", tmp_path)
    shutil.copy(mixed_folder / "a02_truncated.jpg", tmp_path)

    inputs = load_inputs(tmp_path)

    assert [name for name, _ in inputs] == ["a01_good.jpg"]


def test_bench_only_corrupt_exits_2(tmp_path: Path, model_dir: Path, mixed_folder: Path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in UNREADABLE:
        shutil.copy(mixed_folder / name, folder)

    result = bench_cli("--input", str(folder), "--out", str(tmp_path / "out"),
                       "--models", str(model_dir), "--overload-fps", "0")

    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode == 2


def test_frame_size_huge_rejected():
    with pytest.raises(ValueError, match="frame-size"):
        parse_frame_size("100000x100000")


@pytest.mark.parametrize("text", ["0x0", "abc", "640x", "15x480", "-640x480"])
def test_frame_size_invalid_rejected(text: str):
    with pytest.raises(ValueError, match="frame-size"):
        parse_frame_size(text)


@pytest.mark.parametrize("option,value", [
    ("--repeat", "0"),
    ("--repeat", "-1"),
    ("--overload-fps", "-1"),
    ("--overload-seconds", "-5"),
])
def test_bench_invalid_numbers_exit_2(option: str, value: str, tmp_path: Path,
                                      mixed_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]):
    import agent.bench_pipeline

    def started(*args: object, **kwargs: object) -> dict:
        raise AssertionError(f"bench pipeline started with {option} {value}")

    monkeypatch.setattr(agent.bench_pipeline, "run_bench", started)
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(mixed_folder / "a01_good.jpg", folder)

    code = cli_main(["bench", "pipeline", "--input", str(folder), "--out",
                     str(tmp_path / "out"), option, value])

    assert code == 2
    assert option in capsys.readouterr().err
