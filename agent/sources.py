"""Frame sources: a folder of images, a video file, a camera index or a stream URL.

Each source yields `Frame`s. For a file that cannot be decoded, the Frame's
`error` contains the reason, so the pipeline logs it and moves on to the next input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.images import ImageError, read_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One input image, or the reason it could not be read."""

    source: str          # file path, or the video/camera URI with the frame index
    index: int           # position within the source, from 0
    capture_time: float  # seconds since the Unix epoch when the frame was read
    image: np.ndarray | None = None  # H x W x 3 uint8 RGB
    error: str | None = None


def open_source(uri: str, frame_step: int = 1, max_frames: int = 0) -> Iterator[Frame]:
    """Yield frames from `uri`: a folder, a video file, a camera index or a stream URL."""
    path = Path(uri)
    if path.is_dir():
        frames = _folder_frames(path)
    elif uri.isdigit():
        frames = _video_frames(int(uri), uri, frame_step)
    elif "://" in uri or path.is_file():
        frames = _video_frames(uri, uri, frame_step)
    else:
        raise FileNotFoundError(
            f"source {uri!r} is not a folder, a video file, a camera index or a stream URL"
        )

    for count, frame in enumerate(frames, start=1):
        yield frame
        if max_frames and count >= max_frames:
            log.info("source %s: stopped after max_frames=%d", uri, max_frames)
            return


def _folder_frames(folder: Path) -> Iterator[Frame]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    log.info("source %s: %d files", folder, len(files))
    for index, path in enumerate(files):
        capture_time = time.time()
        try:
            image = read_image(path)
        except ImageError as exc:
            yield Frame(str(path), index, capture_time, error=str(exc))
            continue
        yield Frame(str(path), index, capture_time, image=image)


def _video_frames(target: int | str, uri: str, frame_step: int) -> Iterator[Frame]:
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        raise OSError(f"source {uri!r}: OpenCV cannot open it as a video file, camera or stream")
    log.info("source %s: opened with OpenCV backend %s", uri, capture.getBackendName())
    index = 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                log.info("source %s: end of stream after %d frames", uri, index)
                return
            if index % frame_step == 0:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                yield Frame(f"{uri}#{index}", index, time.time(), image=rgb)
            index += 1
    finally:
        capture.release()
