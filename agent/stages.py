"""Recognition stages that overlap: detect and align on worker threads, embed and match in batches.

    FrameQueue --take--> detect workers (N) --faces--> embed worker --results--> run loop
                         detect, crop, prewhiten       batches across frames     in frame order

Each detect worker owns its own MTCNN sessions, because a TFLite interpreter
must not be shared between threads. It takes the next frame from the source,
finds and crops the faces, and converts the crops to the embedder's float input,
so the embed worker only runs the model and the gallery product. The embed
worker gathers faces from several frames into one batch of up to `batch_size`
faces. It waits at most `max_batch_wait_s` after the oldest waiting face, and
not at all when no frame is being detected, because then no more faces can come.

At most `max_in_flight` frames are between their take and their hand-over to
the run loop. When that many are in flight, the workers take no more frames,
the FrameQueue fills, and a live source drops its oldest frames (counted there).
So memory stays bounded however fast frames arrive. Results leave in the order
the frames were taken, which the tracker needs.

All runtimes this agent uses release the GIL while they run a model, so the
stages run in parallel on separate cores.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from agent.config import Config
from agent.detect import Face, FaceDetector
from agent.gallery import Match
from agent.pipeline import Pipeline, Recognition, load_detector
from agent.sources import Frame
from agent.tune import detector_layout

log = logging.getLogger(__name__)

# Frame sources return one of these, a Frame, or None when no frame came in time.
END_OF_SOURCE = object()
# How long a detect worker waits for a frame before it checks for close() again.
TAKE_WAIT_S = 0.5
# How long close() waits for all stage threads together, in seconds.
CLOSE_TIMEOUT_S = 10.0


@dataclass
class FrameResult:
    """A frame and what recognition found in it, or why it was skipped."""

    frame: Frame | None  # None marks the end of the source
    recognitions: list[Recognition] = field(default_factory=list)
    error: str | None = None
    taken_at: float = 0.0  # time.monotonic() when a detect worker took the frame
    finished_at: float = 0.0

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.taken_at


@dataclass
class StageStats:
    """Counters of the stages since start; `busy_s` is the time spent inside the models."""

    frames: int = 0
    faces: int = 0
    batches: int = 0
    detect_busy_s: float = 0.0
    embed_busy_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)


@dataclass
class _Job:
    sequence: int
    result: FrameResult
    faces: list[Face] = field(default_factory=list)
    recognitions: list[Recognition | None] = field(default_factory=list)
    remaining: int = 0


class StagedRecognizer:
    """Runs detect workers and an embed worker over frames taken from `take_frame`.

    `take_frame(timeout_s)` returns a Frame, END_OF_SOURCE, or None when no frame
    came within `timeout_s`. Call start(), then next_result() until it returns
    a FrameResult whose frame is None, then close().
    """

    def __init__(self, pipeline: Pipeline, detectors: list[FaceDetector],
                 take_frame: Callable[[float], object], max_batch_wait_s: float,
                 max_in_flight: int) -> None:
        if not detectors:
            raise ValueError("at least one detector is needed")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.pipeline = pipeline
        self.batch_size = max(1, pipeline.embedder.batch_size)
        self.max_batch_wait_s = max_batch_wait_s
        self.max_in_flight = max_in_flight
        self.stats = StageStats()
        self._detectors = detectors
        self._take_frame = take_frame
        self._lock = threading.Condition()
        self._take_lock = threading.Lock()
        self._next_sequence = 0      # the sequence the next taken frame gets
        self._next_to_hand_over = 0  # the sequence next_result() returns next
        self._in_flight = 0
        self._taking = 0             # workers waiting on take_frame
        self._detecting = 0          # frames taken and not yet through detection
        self._finished: dict[int, FrameResult] = {}
        self._faces: deque[tuple[_Job, int, np.ndarray, float]] = deque()
        self._source_ended = False
        self._closed = False
        self._last_progress = time.monotonic()
        self._threads = [
            threading.Thread(target=self._detect_loop, args=(detector,), name=f"detect-{index}",
                             daemon=True)
            for index, detector in enumerate(detectors)
        ]
        self._threads.append(threading.Thread(target=self._embed_loop, name="embed",
                                              daemon=True))

    # The run loop's side

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        log.info("stages started: %d detect workers, embed batch size %d, max batch wait "
                 "%.0f ms, at most %d frames in flight", len(self._detectors), self.batch_size,
                 self.max_batch_wait_s * 1000, self.max_in_flight)

    def next_result(self, timeout_s: float) -> FrameResult | None:
        """Return the next result in frame order, or None if it is not ready within `timeout_s`."""
        with self._lock:
            ready = self._lock.wait_for(lambda: self._next_to_hand_over in self._finished,
                                        timeout_s)
            if not ready:
                return None
            result = self._finished.pop(self._next_to_hand_over)
            self._next_to_hand_over += 1
            if result.frame is not None:
                self._in_flight -= 1
            self._lock.notify_all()
            return result

    @property
    def detect_workers(self) -> int:
        return len(self._detectors)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def stalled_for(self) -> float:
        """Return the seconds since any stage made progress while frames are in flight, else 0."""
        with self._lock:
            if self._in_flight == 0:
                return 0.0
            return time.monotonic() - self._last_progress

    def close(self) -> int:
        """Stop the workers; return how many taken frames were not handed over."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        # One deadline for all threads, so that several workers stuck in a model
        # add up to CLOSE_TIMEOUT_S, not one timeout each.
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("stage thread %s still running %.0f s after close", thread.name,
                            CLOSE_TIMEOUT_S)
        with self._lock:
            return self._in_flight

    # Detect workers

    def _detect_loop(self, detector: FaceDetector) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            frame = job.result.frame
            assert frame is not None
            if frame.error is not None:
                job.result.error = frame.error
                self._finish(job)
                continue
            assert frame.image is not None
            try:
                started = time.perf_counter()
                faces, inputs = self.pipeline.prepare_faces(frame.image, detector)
                busy = time.perf_counter() - started
            except Exception as exc:
                # One bad frame, such as a shape a runtime rejects, must not stop the
                # worker; the run loop logs the error with the frame's source.
                log.debug("detection failed on %s", frame.source, exc_info=True)
                job.result.error = f"detection failed: {exc!r}"
                self._finish(job)
                continue
            self._queue_faces(job, faces, inputs, busy)

    def _take(self) -> _Job | None:
        """Wait for room in flight, take the next frame and number it; None after close()."""
        while True:
            with self._lock:
                # Workers waiting on the source count against the bound, so their
                # frames cannot exceed it when they arrive. They are not frames in
                # flight until then.
                self._lock.wait_for(lambda: self._closed or self._source_ended
                                    or self._in_flight + self._taking < self.max_in_flight)
                if self._closed or self._source_ended:
                    return None
                self._taking += 1

            # A separate lock, so that a wait for the source does not hold up the
            # embed worker; holding it while numbering keeps the source's order.
            with self._take_lock:
                item = None if self._source_ended else self._take_frame(TAKE_WAIT_S)
                with self._lock:
                    self._taking -= 1
                    self._lock.notify_all()
                    if item is END_OF_SOURCE:
                        self._source_ended = True
                        now = time.monotonic()
                        self._finished[self._next_sequence] = FrameResult(None, taken_at=now,
                                                                          finished_at=now)
                        self._next_sequence += 1
                    if not isinstance(item, Frame) or self._closed:
                        continue
                    now = time.monotonic()
                    if self._in_flight == 0:
                        # Idle time before this frame is not a stall.
                        self._last_progress = now
                    job = _Job(self._next_sequence, FrameResult(item, taken_at=now))
                    self._next_sequence += 1
                    self._in_flight += 1
                    self._detecting += 1
                    return job

    def _queue_faces(self, job: _Job, faces: list[Face], inputs: np.ndarray,
                     busy_s: float) -> None:
        with self._lock:
            self.stats.frames += 1
            self.stats.detect_busy_s += busy_s
            job.faces = faces
            job.recognitions = [None] * len(faces)
            job.remaining = len(faces)
            now = time.monotonic()
            for index in range(len(faces)):
                self._faces.append((job, index, inputs[index], now))
            self._detecting -= 1
            self._last_progress = now
            if not faces:
                self._finish_locked(job)
            self._lock.notify_all()

    # The embed worker

    def _embed_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            jobs = [job for job, _, _, _ in batch]
            try:
                started = time.perf_counter()
                embeddings = self.pipeline.embed_prepared(np.stack([x for _, _, x, _ in batch]))
                matches = self.pipeline.match(embeddings)
                busy = time.perf_counter() - started
            except Exception as exc:
                log.exception("embedding a batch of %d faces failed; skipping frames %s",
                              len(batch), sorted({_source(job) for job in jobs}))
                with self._lock:
                    self._last_progress = time.monotonic()
                    for job in jobs:
                        if job.result.error is None:
                            job.result.error = f"embedding failed: {exc!r}"
                        job.remaining -= 1
                        if job.remaining == 0:
                            self._finish_locked(job)
                    self._lock.notify_all()
                continue
            self._store_matches(batch, embeddings, matches, busy)

    def _next_batch(self) -> list[tuple[_Job, int, np.ndarray, float]] | None:
        """Wait for a full batch, the oldest face's deadline, or an idle detect stage."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                if self._faces:
                    deadline = self._faces[0][3] + self.max_batch_wait_s
                    now = time.monotonic()
                    if (len(self._faces) >= self.batch_size or self._detecting == 0
                            or now >= deadline):
                        count = min(len(self._faces), self.batch_size)
                        return [self._faces.popleft() for _ in range(count)]
                    self._lock.wait(deadline - now)
                else:
                    self._lock.wait()

    def _store_matches(self, batch: list[tuple[_Job, int, np.ndarray, float]],
                       embeddings: np.ndarray, matches: list[Match], busy_s: float) -> None:
        with self._lock:
            self.stats.batches += 1
            self.stats.faces += len(batch)
            self.stats.embed_busy_s += busy_s
            self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
            for (job, index, _, _), embedding, match in zip(batch, embeddings, matches,
                                                            strict=True):
                job.recognitions[index] = Recognition(job.faces[index], embedding, match)
                job.remaining -= 1
                if job.remaining == 0:
                    self._finish_locked(job)
            self._last_progress = time.monotonic()
            self._lock.notify_all()

    # Results

    def _finish(self, job: _Job) -> None:
        """Finish a frame that leaves before the embed stage: unreadable or failed in detection."""
        with self._lock:
            self._detecting -= 1
            self._last_progress = time.monotonic()
            self._finish_locked(job)
            self._lock.notify_all()

    def _finish_locked(self, job: _Job) -> None:
        result = job.result
        result.recognitions = [r for r in job.recognitions if r is not None]
        result.finished_at = time.monotonic()
        self._finished[job.sequence] = result


def build_stages(pipeline: Pipeline, config: Config,
                 take_frame: Callable[[float], object]) -> StagedRecognizer:
    """Load a detector per detect worker and return the stages, not yet started.

    agent.tune.detector_layout splits the cores between the detect workers, in
    the layout that `tune` timed the detector in. One worker, or
    workers on TensorFlow, reuse the pipeline's detector.
    """
    service = config.service
    selection = pipeline.selection
    cores = (selection.threads if selection is not None else 0) or os.cpu_count() or 1
    workers, threads = detector_layout(cores, service.detect_workers)
    detectors: list[FaceDetector]
    if workers == 1 or selection is None:
        detectors = [pipeline.detector]
    elif selection.detector.runtime == "tensorflow":
        # TensorFlow's thread pools are per process and its sessions may be
        # called from several threads, so the workers share the pipeline's detector.
        detectors = [pipeline.detector] * workers
    else:
        detectors = [load_detector(config, pipeline.manifest, selection.detector, threads)
                     for _ in range(workers)]
        for detector in detectors:
            # The first run of each shape allocates buffers; keep it out of frame one.
            detector.detect(np.zeros((120, 160, 3), dtype=np.uint8))
    return StagedRecognizer(pipeline, detectors, take_frame,
                            service.max_batch_wait_ms / 1000.0,
                            service.max_frames_in_flight or frames_in_flight(pipeline))


def frames_in_flight(pipeline: Pipeline) -> int:
    """Return the default bound on frames in flight: room for two batches of one-face frames.

    One batch runs while the next fills; with fewer frames in flight the
    embed worker would take part-full batches whenever frames hold one face.
    """
    return min(64, max(8, 2 * pipeline.embedder.batch_size))


def _source(job: _Job) -> str:
    return job.result.frame.source if job.result.frame is not None else "end of source"
