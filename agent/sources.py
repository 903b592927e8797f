"""Frame sources: a folder of images, an image or video file, a camera index or a stream URL.

Each source yields `Frame`s. For a file that cannot be decoded, the Frame's
`error` contains the reason, so the pipeline logs it and moves on to the next input.
A camera or stream URL is live: when it fails to open or its stream ends, it is
reopened with exponential back-off until the caller's stop event is set.
"""

from __future__ import annotations

import logging
import os
import random
import stat
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.images import ImageError, read_image

log = logging.getLogger(__name__)

# A file with one of these extensions is a one-image source, read through
# read_image so that EXIF rotation and the size and truncation checks apply.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm"}
)

# Reconnect delays for live sources: doubling from the first to the maximum, each
# scaled by a random factor in [0.5, 1] so that many agents do not retry in step.
RECONNECT_FIRST_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 30.0

# FFmpeg open and read timeouts for stream URLs. A stalled stream blocks a read for
# up to this long, which bounds how late a stop request is noticed.
STREAM_TIMEOUT_MS = 5000

# Skipped folder entries logged one per line; the rest are counted in one line.
MAX_SKIPPED_LOGGED = 10


@dataclass(frozen=True)
class Frame:
    """One input image, or the reason it could not be read."""

    source: str          # file path, or the video/camera URI with the frame index
    index: int           # position within the source, from 0
    capture_time: float  # seconds since the Unix epoch when the frame was read
    image: np.ndarray | None = None  # H x W x 3 uint8 RGB
    error: str | None = None


def open_source(uri: str, frame_step: int = 1, max_frames: int = 0,
                stop: threading.Event | None = None) -> Iterator[Frame]:
    """Yield frames from `uri`: a folder, an image or video file, a camera index or a URL.

    A camera or URL source reconnects until `stop` is set, so without `stop` it
    only ends at `max_frames`. Raises FileNotFoundError for a path that does not
    exist and OSError for a file that OpenCV cannot read as a video.
    """
    path = Path(uri)
    stop = stop or threading.Event()
    if path.is_dir():
        frames = _folder_frames(path)
    elif uri.isdigit():
        frames = _live_frames(int(uri), uri, frame_step, stop)
    elif "://" in uri:
        frames = _live_frames(uri, uri, frame_step, stop)
    elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        frames = _image_frames(path)
    elif path.is_file():
        frames = _video_frames(uri, frame_step)
    else:
        raise FileNotFoundError(
            f"source {uri!r} not found: it is not a folder, a video file, an image file, "
            "a camera index or a stream URL"
        )

    for count, frame in enumerate(frames, start=1):
        yield frame
        if max_frames and count >= max_frames:
            log.info("source %s: stopped after max_frames=%d", uri, max_frames)
            return


def _folder_frames(folder: Path) -> Iterator[Frame]:
    files = _folder_files(folder)
    log.info("source %s: %d files", folder, len(files))
    for index, path in enumerate(files):
        capture_time = time.time()
        try:
            image = read_image(path)
        except ImageError as exc:
            yield Frame(str(path), index, capture_time, error=str(exc))
            continue
        yield Frame(str(path), index, capture_time, image=image)


def _folder_files(folder: Path) -> list[Path]:
    """List the regular files under `folder`, sorted, logging every entry left out.

    Symbolic links to files are followed; links to folders are not, so a link
    loop cannot recurse. Hidden files (names starting with '.') are left out
    without a message.
    """
    skipped: list[tuple[str, str]] = []
    root_unreadable = False

    def on_walk_error(exc: OSError) -> None:
        nonlocal root_unreadable
        if exc.filename is not None and Path(exc.filename) == folder:
            root_unreadable = True
            log.warning("source %s: cannot read the source folder: %s", folder, exc.strerror)
        else:
            skipped.append((str(exc.filename), f"cannot read folder: {exc.strerror}"))

    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_walk_error):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                skipped.append((path, "symbolic link to a folder, not followed"))
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            reason = _not_regular_reason(path)
            if reason is None:
                files.append(Path(path))
            else:
                skipped.append((path, reason))

    _log_skipped(folder, skipped)
    if not files and not root_unreadable:
        log.warning("source %s: no files found in the source folder", folder)
    return sorted(files)


def _not_regular_reason(path: str) -> str | None:
    """Return why `path` cannot be read as a photo, or None for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if os.path.islink(path):
            return f"broken symbolic link: {exc.strerror}"
        return f"cannot stat: {exc.strerror}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO), not a regular file"
    if stat.S_ISSOCK(mode):
        return "socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file, not a regular file"
    return "not a regular file"


def _log_skipped(folder: Path, skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped[:MAX_SKIPPED_LOGGED]:
        log.warning("source %s: skipped %s: %s", folder, path, reason)
    if len(skipped) > MAX_SKIPPED_LOGGED:
        log.warning("source %s: skipped %d more entries that are not readable regular files",
                    folder, len(skipped) - MAX_SKIPPED_LOGGED)


def _image_frames(path: Path) -> Iterator[Frame]:
    # An undecodable file fails the whole source, because it is the only input.
    image = read_image(path)
    yield Frame(str(path), 0, time.time(), image=image)


def _video_frames(uri: str, frame_step: int) -> Iterator[Frame]:
    capture = cv2.VideoCapture(uri)
    if not capture.isOpened():
        capture.release()
        raise OSError(f"source {uri!r}: OpenCV cannot open the file as a video; "
                      "check that it is a video file in a format FFmpeg reads")
    log.info("source %s: opened with OpenCV backend %s", uri, capture.getBackendName())
    count = yield from _read_capture(capture, uri, frame_step, 0, None)
    if count == 0:
        raise OSError(f"source {uri!r}: OpenCV opened the file but read no frame from it; "
                      "check that it is a video file and that it is not empty or damaged")
    log.info("source %s: end of video after %d frames", uri, count)


def _live_frames(target: int | str, uri: str, frame_step: int,
                 stop: threading.Event) -> Iterator[Frame]:
    """Yield frames from a camera or stream, reopening it after each failure until `stop`."""
    index = 0
    failures = 0
    while not stop.is_set():
        capture = _open_live(target)
        if capture.isOpened():
            if failures:
                log.info("source %s: reconnected after %d failed attempts", uri, failures)
            else:
                log.info("source %s: opened with OpenCV backend %s", uri,
                         capture.getBackendName())
            start = index
            index = yield from _read_capture(capture, uri, frame_step, index, stop)
            if stop.is_set():
                return
            if index > start:
                failures = 0
            reason = f"stream ended after {index - start} frames"
        else:
            capture.release()
            reason = "OpenCV cannot open it as a camera or stream"

        failures += 1
        delay = _reconnect_delay(failures)
        if failures == 1:
            log.warning("source %s: %s; reconnecting with back-off of up to %.0f s until stopped",
                        uri, reason, RECONNECT_MAX_DELAY_S)
        else:
            log.debug("source %s: reconnect attempt %d failed (%s); next attempt in %.1f s",
                      uri, failures - 1, reason, delay)
        if stop.wait(delay):
            return


def _open_live(target: int | str) -> cv2.VideoCapture:
    if isinstance(target, int):
        return cv2.VideoCapture(target)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
              cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
    return cv2.VideoCapture(target, cv2.CAP_ANY, params)


def _reconnect_delay(failures: int) -> float:
    base = min(RECONNECT_MAX_DELAY_S, RECONNECT_FIRST_DELAY_S * 2 ** min(failures - 1, 30))
    return base * random.uniform(0.5, 1.0)


def _read_capture(capture: cv2.VideoCapture, uri: str, frame_step: int, index: int,
                  stop: threading.Event | None) -> Generator[Frame, None, int]:
    """Yield every `frame_step`-th frame from `capture` and return the next frame index.

    Frame indices continue from `index`, so frames stay unique across reconnects.
    The capture is released when reading ends or the caller closes the generator.
    """
    try:
        while stop is None or not stop.is_set():
            ok, bgr = capture.read()
            if not ok:
                break
            if index % frame_step == 0:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                yield Frame(f"{uri}#{index}", index, time.time(), image=rgb)
            index += 1
    finally:
        capture.release()
    return index
