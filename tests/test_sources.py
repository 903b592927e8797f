"""Frame sources: folders and video files, read through the same iterator."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import load_config
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
    with pytest.raises(FileNotFoundError, match="is not a folder, a video file"):
        list(open_source(str(tmp_path / "absent")))


def test_video_run_publishes_per_frame(tmp_path: Path, example_data: Path, model_dir: Path,
                                       mqtt_broker: MosquittoBroker) -> None:
    photos = sorted((example_data / "val" / "mindy_kaling").glob("*.jpg"))[:2]
    video = tmp_path / "clip.avi"
    write_video(video, photos, repeats=2)
    config_path = write_config(tmp_path / "agent.yaml", model_dir, tmp_path / "gallery.db",
                               video, mqtt_broker.port)
    subscriber = mqtt_broker.subscriber(EVENT_TOPIC)

    status = run_agent(load_config(config_path))

    assert status == 0
    events = [json.loads(m.payload) for m in subscriber.wait_for(4, timeout=10)]
    assert sorted({e["frame_index"] for e in events}) == [0, 1, 2, 3]
    assert all(e["source"].startswith(f"{video}#") for e in events)
