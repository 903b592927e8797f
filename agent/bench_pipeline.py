"""`facenet-agent bench pipeline`: the whole pipeline's speed, on frames held in memory.

Four measurements, each on the same decoded inputs:

- throughput: every input through the stages (agent/stages.py) as fast as
  they go, with images/s, faces/s and p50/p95 latency from a detect worker
  taking the frame to its hand-over;
- embed stage: the stages fed faces whose detections are known in advance, so
  that only cropping, batching, embedding and matching run. Its faces/s is
  compared with the embedder's session run back to back on batches of the same
  size, which is the most the stage could reach. It runs twice: with the
  embedder's threads of the run loop (agent.pipeline.embedder_threads), and
  with the embedder on every thread;
- overload: a paced source offering frames faster than the pipeline runs, into
  a FrameQueue that drops the oldest frame like a camera does. It samples the
  resident memory and counts dropped frames;
- detector settings: time per frame and faces found for a few min_face_size,
  max_input_side and worker settings.

Decoding happens before the clock starts for every pipeline compared in
benchmarks/pipelines.py, so the numbers compare recognition only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.config import Config
from agent.detect import Face, MtcnnDetector
from agent.health import RunStats
from agent.pipeline import Pipeline, embedder_threads, load_detector
from agent.sources import Frame
from agent.stages import (
    END_OF_SOURCE,
    FrameResult,
    StagedRecognizer,
    build_stages,
    frames_in_flight,
)
from agent.tune import resident_mb, time_batches

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


# Inputs


def letterbox(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale an RGB image to fit width x height, keeping its aspect, and pad it with black."""
    scale = min(width / image.shape[1], height / image.shape[0])
    new_width = max(1, round(image.shape[1] * scale))
    new_height = max(1, round(image.shape[0] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_width, new_height), interpolation=interpolation)
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    top = (height - new_height) // 2
    left = (width - new_width) // 2
    frame[top:top + new_height, left:left + new_width] = resized
    return frame


def load_inputs(folder: Path, frame_size: tuple[int, int] | None = None,
                limit: int = 0) -> list[tuple[str, np.ndarray]]:
    """Decode every image under `folder`, sorted by path; letterbox them to `frame_size` if set."""
    from agent.images import ImageError, read_image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    inputs = []
    for path in paths:
        try:
            image = read_image(path)
        except (ImageError, OSError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if frame_size is not None:
            image = letterbox(image, *frame_size)
        inputs.append((str(path.relative_to(folder)), image))
    if not inputs:
        raise ValueError(f"no readable images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return inputs


def memory_source(inputs: list[tuple[str, np.ndarray]],
                  repeat: int = 1) -> Callable[[float], object]:
    """Return a take_frame function that hands out the inputs `repeat` times, then the end."""
    frames = iter([Frame(name, index, time.time(), image)
                   for index, (name, image) in enumerate(inputs * repeat)])
    lock = threading.Lock()

    def take(timeout_s: float) -> object:
        with lock:
            return next(frames, END_OF_SOURCE)

    return take


# Measurements


def summarize(results: list[FrameResult], seconds: float) -> dict[str, Any]:
    """Return images/s, faces/s and latency percentiles of one run's results."""
    faces = sum(len(r.recognitions) for r in results)
    latencies = np.array([r.latency_s * 1000.0 for r in results]) if results else np.zeros(1)
    return {
        "images": len(results),
        "faces": faces,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(results) / seconds, 2),
        "faces_per_s": round(faces / seconds, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "errors": sum(1 for r in results if r.error is not None),
    }


def drain_stages(stages: StagedRecognizer) -> list[FrameResult]:
    """Start the stages, collect every result until the end of the source, then close them."""
    results: list[FrameResult] = []
    stages.start()
    try:
        while True:
            result = stages.next_result(60.0)
            if result is None:
                raise TimeoutError("the stages returned nothing for 60 s")
            if result.frame is None:
                return results
            results.append(result)
    finally:
        stages.close()


def measure_throughput(pipeline: Pipeline, config: Config,
                       inputs: list[tuple[str, np.ndarray]], repeat: int = 1) -> dict[str, Any]:
    """Run every input through the stages and return the summary with the stage counters."""
    stages = build_stages(pipeline, config, memory_source(inputs, repeat))
    started = time.perf_counter()
    results = drain_stages(stages)
    seconds = time.perf_counter() - started
    stats = stages.stats
    report = summarize(results, seconds)
    report.update({
        "detect_workers": stages.detect_workers,
        "batch_size": stages.batch_size,
        "batch_sizes": dict(sorted(stats.batch_sizes.items())),
        "detect_busy_s": round(stats.detect_busy_s, 3),
        "embed_busy_s": round(stats.embed_busy_s, 3),
        # The share of the run in which the embed worker was inside the model or
        # the gallery product.
        "embed_busy_share": round(stats.embed_busy_s / seconds, 3),
    })
    return report


class KnownFaces:
    """A detector stand-in that returns detections found earlier, keyed by the image object."""

    def __init__(self, detections: dict[int, list[Face]]) -> None:
        self._detections = detections

    def detect(self, image: np.ndarray) -> list[Face]:
        return self._detections[id(image)]


def measure_embed_stage(pipeline: Pipeline, config: Config, inputs: list[tuple[str, np.ndarray]],
                        min_faces: int = 256, seconds: float = 3.0) -> dict[str, Any]:
    """Compare the embed stage's faces/s with the session's standalone faces/s at its batch size."""
    detections = {id(image): pipeline.detector.detect(image) for _, image in inputs}
    faces_per_pass = sum(len(faces) for faces in detections.values())
    if faces_per_pass == 0:
        raise ValueError("no face found in the inputs, so the embed stage has nothing to do")
    repeat = -(-min_faces // faces_per_pass)
    known = KnownFaces(detections)
    stages = StagedRecognizer(pipeline, [known], memory_source(inputs, repeat),
                              config.service.max_batch_wait_ms / 1000.0,
                              config.service.max_frames_in_flight or frames_in_flight(pipeline))
    started = time.perf_counter()
    results = drain_stages(stages)
    staged_seconds = time.perf_counter() - started
    staged_faces = sum(len(r.recognitions) for r in results)

    # Standalone: the same session on real crops of the same batch size, back to back.
    batch_size = stages.batch_size
    _, crops = pipeline.prepare_faces(inputs[0][1])
    crops = np.concatenate([crops] * -(-batch_size // max(len(crops), 1)))[:batch_size]
    batch_ms = time_batches(pipeline.embedder.session, crops, seconds)
    standalone = batch_size * 1000.0 / batch_ms
    staged = staged_faces / staged_seconds
    return {
        "batch_size": batch_size,
        "faces": staged_faces,
        "staged_faces_per_s": round(staged, 2),
        "standalone_faces_per_s": round(standalone, 2),
        "ratio": round(staged / standalone, 3),
        "batch_sizes": dict(sorted(stages.stats.batch_sizes.items())),
    }


def measure_overload(pipeline: Pipeline, config: Config, inputs: list[tuple[str, np.ndarray]],
                     fps: float, seconds: float) -> dict[str, Any]:
    """Offer frames at `fps` for `seconds` through a dropping FrameQueue; sample memory."""
    from agent.service import _END_OF_SOURCE, _NO_FRAME, FrameQueue

    stats = RunStats()
    queue = FrameQueue(config.service.frame_queue_size, drop_oldest=True, stats=stats)
    offered = 0
    stop = threading.Event()

    def camera() -> None:
        nonlocal offered
        period = 1.0 / fps
        next_time = time.perf_counter()
        deadline = next_time + seconds
        while not stop.is_set() and time.perf_counter() < deadline:
            name, image = inputs[offered % len(inputs)]
            # A camera delivers a new buffer each frame, so each frame is a copy.
            queue.put(Frame(name, offered, time.time(), image.copy()))
            offered += 1
            next_time += period
            time.sleep(max(0.0, next_time - time.perf_counter()))
        queue.put(_END_OF_SOURCE)

    def take(timeout_s: float) -> object:
        item = queue.get(timeout_s)
        if item is _NO_FRAME:
            return None
        return END_OF_SOURCE if item is _END_OF_SOURCE else item

    stages = build_stages(pipeline, config, take)
    samples: list[float] = []
    thread = threading.Thread(target=camera, name="paced-source", daemon=True)
    started = time.perf_counter()
    thread.start()
    stages.start()
    # Only the latency of each frame is kept: holding the results would keep
    # every frame's image alive and grow the memory this run measures.
    latencies_ms: list[float] = []
    last_sample = 0.0
    try:
        while True:
            now = time.perf_counter()
            if now - last_sample >= 0.5:
                samples.append(resident_mb())
                last_sample = now
            result = stages.next_result(0.1)
            if result is None:
                continue
            if result.frame is None:
                break
            latencies_ms.append(result.latency_s * 1000.0)
    finally:
        stop.set()
        stages.close()
        thread.join(5.0)
    elapsed = time.perf_counter() - started
    dropped = stats.snapshot()["frames_dropped"]
    tail = samples[len(samples) // 4:] or samples
    return {
        "offered_fps": fps,
        "seconds": round(elapsed, 2),
        "frames_offered": offered,
        "frames_processed": len(latencies_ms),
        "frames_dropped": dropped,
        "processed_plus_dropped": len(latencies_ms) + dropped,
        "processed_fps": round(len(latencies_ms) / elapsed, 2),
        "rss_mb_first_quarter_max": round(max(samples[:len(samples) // 4] or samples), 1),
        "rss_mb_rest_max": round(max(tail), 1),
        "rss_mb_last": round(samples[-1], 1),
        "p95_ms": round(float(np.percentile(latencies_ms or [0.0], 95)), 1),
    }


def measure_detector_settings(pipeline: Pipeline, config: Config,
                              inputs: list[tuple[str, np.ndarray]],
                              settings: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time detection per frame for each detection setting; count faces found."""
    assert pipeline.selection is not None
    rows = []
    for overrides in settings:
        detection = dataclasses.replace(config.detection, **overrides)
        variant = dataclasses.replace(config, detection=detection)
        detector: MtcnnDetector = load_detector(variant, pipeline.manifest,
                                                pipeline.selection.detector,
                                                pipeline.selection.threads)
        detector.detect(inputs[0][1])
        started = time.perf_counter()
        faces = sum(len(detector.detect(image)) for _, image in inputs)
        ms = (time.perf_counter() - started) * 1000.0 / len(inputs)
        rows.append({**overrides, "ms_per_frame": round(ms, 1), "faces": faces})
        log.info("detector %s: %.1f ms per frame, %d faces", overrides, ms, faces)
    return rows


def format_report(report: dict[str, Any]) -> str:
    """Format a bench pipeline report as Markdown."""
    lines = [f"# Pipeline benchmark on {report['machine']['cpu']} "
             f"({report['machine']['cpus']} CPUs)", ""]
    for key in ("selection", "embedder_threads", "inputs"):
        lines.append(f"- {key}: {report[key]}")
    lines.append("")
    for section in ("throughput", "throughput_other_workers", "embed_stage",
                    "embed_stage_every_thread", "overload"):
        if section in report:
            lines += [f"## {section}", "", "| key | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in report[section].items()]
            lines.append("")
    rows = report.get("detector_settings") or []
    if rows:
        keys = list(rows[0])
        lines += ["## detector settings", "", "| " + " | ".join(keys) + " |",
                  "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_bench(config: Config, input_dir: Path, out: Path, frame_size: tuple[int, int] | None,
              repeat: int, overload_fps: float, overload_seconds: float,
              pipeline: Pipeline | None = None) -> dict[str, Any]:
    """Run every measurement, write pipeline.json and pipeline.md into `out`, return the report."""
    import json

    from agent.bench import machine_description
    from agent.pipeline import build_pipeline

    # Inputs first, so that a folder without readable images fails before the models load.
    inputs = load_inputs(input_dir, frame_size)
    pipeline = pipeline or build_pipeline(config, for_stages=True)
    selection = pipeline.selection
    report: dict[str, Any] = {
        "machine": machine_description(),
        "selection": dataclasses.asdict(selection) if selection is not None else None,
        "embedder_threads": embedder_threads(config, selection) if selection is not None
                            else None,
        "inputs": f"{len(inputs)} images from {input_dir}"
                  + (f", letterboxed to {frame_size[0]}x{frame_size[1]}" if frame_size else ""),
    }
    report["throughput"] = measure_throughput(pipeline, config, inputs, repeat)
    # The same run with the other worker layout: one worker with every core, or two.
    workers = 1 if report["throughput"]["detect_workers"] != 1 else 2
    other = dataclasses.replace(config, service=dataclasses.replace(config.service,
                                                                    detect_workers=workers))
    report["throughput_other_workers"] = measure_throughput(pipeline, other, inputs, repeat)
    report["embed_stage"] = measure_embed_stage(pipeline, config, inputs)
    # The same with the embedder on every thread, as enrolment and eval load it,
    # to show what sharing the cores with the detect workers costs it.
    every_thread = build_pipeline(config)
    try:
        report["embed_stage_every_thread"] = measure_embed_stage(every_thread, config, inputs)
    finally:
        every_thread.gallery.close()
    if overload_fps > 0:
        report["overload"] = measure_overload(pipeline, config, inputs, overload_fps,
                                              overload_seconds)
    side = config.detection.max_input_side
    report["detector_settings"] = measure_detector_settings(pipeline, config, inputs, [
        {"min_face_size": 20, "max_input_side": side},
        {"min_face_size": 40, "max_input_side": side},
        {"min_face_size": 20, "max_input_side": 480},
        {"min_face_size": 40, "max_input_side": 480},
    ])
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(report, indent=2, default=str) + "\n",
                                       encoding="utf-8")
    (out / "pipeline.md").write_text(format_report(report), encoding="utf-8")
    log.info("wrote %s and %s", out / "pipeline.json", out / "pipeline.md")
    return report
