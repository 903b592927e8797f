"""Frame sources: folders, image and video files and live streams, read through one iterator."""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from agent import sources
from agent.config import load_config
from agent.images import ImageError
from agent.service import run_agent
from agent.sources import open_source
from tests.broker import MosquittoBroker
from tests.test_end_to_end import EVENT_TOPIC, write_config


def write_video(path: Path, photos: list[Path], repeats: int) -> None:
    """Write each photo, letterboxed into 640x480, as `repeats` frames of an MJPEG AVI."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (640, 480))
    assert writer.isOpened()
    for photo in photos:
        image = cv2.imread(str(photo))
        scale = min(640 / image.shape[1], 480 / image.shape[0])
        resized = cv2.resize(image, None, fx=scale, fy=scale)
        frame = np.zeros((480, 640, 3), dtype=np.uint8)
        frame[: resized.shape[0], : resized.shape[1]] = resized
        for _ in range(repeats):
            writer.write(frame)
    writer.release()


def test_folder_source_sorted_with_errors(tmp_path: Path) -> None:
    ok, png = cv2.imencode(".png", np.zeros((4, 4, 3), dtype=np.uint8))
    (tmp_path / "b.png").write_bytes(png.tobytes())
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / ".hidden.png").write_bytes(png.tobytes())

    frames = list(open_source(str(tmp_path)))

    assert [Path(f.source).name for f in frames] == ["a.jpg", "b.png"]
    assert frames[0].image is None
    assert frames[0].error is not None and "file is empty" in frames[0].error
    assert frames[1].image is not None and frames[1].image.shape == (4, 4, 3)


def test_video_source_honours_frame_step(tmp_path: Path, example_data: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, sorted((example_data / "val" / "madonna").glob("*.jpg"))[:2], repeats=3)

    frames = list(open_source(str(video), frame_step=2))

    assert [f.index for f in frames] == [0, 2, 4]
    assert [f.source for f in frames] == [f"{video}#0", f"{video}#2", f"{video}#4"]
    assert all(f.image is not None and f.image.shape == (480, 640, 3) for f in frames)


def test_max_frames_stops_source(tmp_path: Path, example_data: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, sorted((example_data / "val" / "madonna").glob("*.jpg"))[:1], repeats=5)

    frames = list(open_source(str(video), max_frames=2))

    assert len(frames) == 2


def test_missing_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent' not found: it is not a folder"):
        list(open_source(str(tmp_path / "absent")))


def test_video_run_publishes_per_frame(tmp_path: Path, example_data: Path, model_dir: Path,
                                       mqtt_broker: MosquittoBroker) -> None:
    photos = sorted((example_data / "val" / "mindy_kaling").glob("*.jpg"))[:2]
    video = tmp_path / "clip.avi"
    write_video(video, photos, repeats=2)
    config_path = write_config(tmp_path / "agent.yaml", model_dir, tmp_path / "gallery.db",
                               video, mqtt_broker.port)
    # A video source defaults to appearance events; this test checks one event per frame.
    config = yaml.safe_load(config_path.read_text())
    config["events"] = {"mode": "frame"}
    config_path.write_text(yaml.safe_dump(config))
    subscriber = mqtt_broker.subscriber(EVENT_TOPIC)

    status = run_agent(load_config(config_path))

    assert status == 0
    events = [json.loads(m.payload) for m in subscriber.wait_for(4, timeout=10)]
    assert sorted({e["frame_index"] for e in events}) == [0, 1, 2, 3]
    assert all(e["source"].startswith(f"{video}#") for e in events)


def _jpeg(width: int = 40, height: int = 20, orientation: int | None = None) -> bytes:
    image = Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8))
    out = io.BytesIO()
    if orientation is None:
        image.save(out, format="JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_image_file_source_applies_exif(tmp_path: Path) -> None:
    # Orientation 6 means the stored 40x20 pixels are shown rotated, as 20x40.
    photo = tmp_path / "rotated.JPG"
    photo.write_bytes(_jpeg(orientation=6))

    frames = list(open_source(str(photo)))

    assert len(frames) == 1
    assert frames[0].source == str(photo)
    assert frames[0].image is not None
    assert frames[0].image.shape == (40, 20, 3)


def test_image_file_source_checks_input(tmp_path: Path) -> None:
    photo = tmp_path / "cut.jpg"
    photo.write_bytes(_jpeg()[:-200])

    with pytest.raises(ImageError, match="cut.jpg: truncated JPEG"):
        list(open_source(str(photo)))


def test_video_without_frames_rejected(tmp_path: Path) -> None:
    # An AVI with a header and no frames: OpenCV opens it, then reads nothing.
    clip = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    writer.release()

    with pytest.raises(OSError, match="empty.avi.*opened the file but read no frame"):
        list(open_source(str(clip)))


class _MjpegHandler(http.server.BaseHTTPRequestHandler):
    """Serves `frames_per_connection` JPEG frames as multipart MJPEG, then closes."""

    frames_per_connection = 5
    jpeg = b""

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            for _ in range(self.frames_per_connection):
                header = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                self.wfile.write(header % len(self.jpeg) + self.jpeg + b"\r\n")
                time.sleep(0.02)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mjpeg_url() -> Iterator[str]:
    _MjpegHandler.jpeg = _jpeg(64, 48)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MjpegHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/video.mjpg"
    server.shutdown()
    server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/video.mjpg"


def test_stream_reconnects_after_drop(mjpeg_url: str, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sources, "RECONNECT_FIRST_DELAY_S", 0.05)

    with caplog.at_level(logging.DEBUG, logger="agent.sources"):
        frames = list(open_source(mjpeg_url, max_frames=12))

    # Each connection serves 5 frames, so 12 frames take three connections.
    assert len(frames) == 12
    assert [f.index for f in frames] == list(range(12))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("stream ended after" in w and "reconnecting" in w for w in warnings)


def test_unreachable_stream_retried(closed_port_url: str, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sources, "RECONNECT_FIRST_DELAY_S", 0.01)
    monkeypatch.setattr(sources, "RECONNECT_MAX_DELAY_S", 0.02)
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()

    with caplog.at_level(logging.DEBUG, logger="agent.sources"):
        frames = list(open_source(closed_port_url, stop=stop))

    timer.cancel()
    assert frames == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    retries = [r for r in caplog.records
               if r.levelno == logging.DEBUG and "attempt" in r.getMessage()]
    assert len(warnings) == 1
    assert "cannot open" in warnings[0].getMessage()
    assert len(retries) >= 2
    assert "reconnect attempt 2 failed" in retries[1].getMessage()


def test_stop_ends_back_off_promptly(closed_port_url: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "RECONNECT_FIRST_DELAY_S", 60.0)
    monkeypatch.setattr(sources, "RECONNECT_MAX_DELAY_S", 60.0)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()

    frames = list(open_source(closed_port_url, stop=stop))

    assert frames == []
    assert time.monotonic() - started < 5.0


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_folder_special_entries_logged(tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "loop_a.jpg").symlink_to(tmp_path / "loop_b.jpg")
    (tmp_path / "loop_b.jpg").symlink_to(tmp_path / "loop_a.jpg")
    (tmp_path / "dir_loop").symlink_to(tmp_path)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing" / "x.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")

    with caplog.at_level(logging.WARNING, logger="agent.sources"):
        frames = list(open_source(str(tmp_path)))

    assert [Path(f.source).name for f in frames] == ["a.jpg"]
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == 5
    assert any("loop_a.jpg" in w for w in warnings)
    assert any("loop_b.jpg" in w for w in warnings)
    assert any("dir_loop: symbolic link to a folder, not followed" in w for w in warnings)
    assert any("dangling.jpg: broken symbolic link" in w for w in warnings)
    assert any("fifo.jpg: named pipe (FIFO)" in w for w in warnings)


def test_folder_many_skips_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    for n in range(25):
        (tmp_path / f"dangling{n:02d}.jpg").symlink_to(tmp_path / "missing.jpg")

    with caplog.at_level(logging.WARNING, logger="agent.sources"):
        frames = list(open_source(str(tmp_path)))

    assert len(frames) == 1
    warnings = _messages(caplog, logging.WARNING)
    assert len(warnings) == sources.MAX_SKIPPED_LOGGED + 1
    assert "skipped 15 more entries" in warnings[-1]


def test_folder_unreadable_subfolder_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    # Tests may run as root, which chmod cannot lock out, so scandir fails on purpose.
    (tmp_path / "a.jpg").write_bytes(_jpeg())
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "b.jpg").write_bytes(_jpeg())
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    with caplog.at_level(logging.WARNING, logger="agent.sources"):
        frames = list(open_source(str(tmp_path)))

    assert [Path(f.source).name for f in frames] == ["a.jpg"]
    warnings = _messages(caplog, logging.WARNING)
    assert warnings == [f"source {tmp_path}: skipped {locked}: cannot read folder: "
                        "Permission denied"]


def test_folder_unreadable_root_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if Path(path) == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    with caplog.at_level(logging.WARNING, logger="agent.sources"):
        frames = list(open_source(str(tmp_path)))

    assert frames == []
    assert _messages(caplog, logging.WARNING) == [
        f"source {tmp_path}: cannot read the source folder: Permission denied"]


def test_folder_empty_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.sources"):
        frames = list(open_source(str(tmp_path)))

    assert frames == []
    assert _messages(caplog, logging.WARNING) == [
        f"source {tmp_path}: no files found in the source folder"]
