"""Overlapping stages: order, batching across frames, the in-flight bound, errors, stalls.

Real models, real photos and a real SQLite gallery enrolled from the example
train/ folder. The names the stages give the val/ faces are checked against
the folder each photo sits in, and their distances against the same pipeline
run one image at a time.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.bench_pipeline import KnownFaces, load_inputs, measure_overload, memory_source
from agent.config import parse_config
from agent.enroll import enroll_folder
from agent.pipeline import Pipeline, build_pipeline, embedder_threads
from agent.sources import Frame
from agent.stages import END_OF_SOURCE, FrameResult, StagedRecognizer, build_stages
from agent.tune import Selection, StageChoice


@pytest.fixture(scope="module")
def pipeline(model_dir: Path, example_data: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("stages")
    config = parse_config({
        "device_id": "stages",
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(folder / "gallery.db")},
        "runtime": {"name": "onnxruntime", "batch_size": 4, "cache_dir": str(folder / "cache")},
        "service": {"detect_workers": 2, "max_batch_wait_ms": 200},
    })
    built = build_pipeline(config)
    enroll_folder(built, example_data / "train")
    yield built
    built.gallery.close()


@pytest.fixture(scope="module")
def val_inputs(example_data: Path) -> list[tuple[str, np.ndarray]]:
    return load_inputs(example_data / "val")


def run_all(stages: StagedRecognizer) -> list[FrameResult]:
    results = []
    stages.start()
    try:
        while (result := stages.next_result(60.0)) is not None and result.frame is not None:
            results.append(result)
        assert result is not None, "the stages returned nothing for 60 s"
    finally:
        stages.close()
    return results


def test_stages_name_val_faces_in_order(pipeline: Pipeline,
                                        val_inputs: list[tuple[str, np.ndarray]]):
    stages = build_stages(pipeline, pipeline.config, memory_source(val_inputs))
    assert stages.detect_workers == 2

    results = run_all(stages)

    assert [r.frame.source for r in results if r.frame] == [name for name, _ in val_inputs]
    assert all(r.error is None for r in results)
    for result, (name, image) in zip(results, val_inputs, strict=True):
        expected = pipeline.recognize(image)
        got = result.recognitions
        assert len(got) == len(expected), name
        for staged, single in zip(got, expected, strict=True):
            assert staged.match.identity_id == single.match.identity_id, name
            assert abs(staged.match.distance - single.match.distance) < 1e-4, name
    # The folder a photo sits in names its person; the best face of each photo must match.
    named = [r for r in results if r.recognitions and r.frame
             and r.recognitions[0].match.name == Path(r.frame.source).parts[0]]
    assert len(named) >= 24, [(r.frame.source if r.frame else None,
                               [x.match.name for x in r.recognitions]) for r in results]


def test_stages_batch_faces_across_frames(pipeline: Pipeline,
                                          val_inputs: list[tuple[str, np.ndarray]]):
    # Detections found in advance make detection instant, so faces of several
    # frames wait together while a batch runs.
    detections = {id(image): pipeline.detector.detect(image) for _, image in val_inputs}
    stages = StagedRecognizer(pipeline, [KnownFaces(detections)],
                              memory_source(val_inputs, repeat=4), max_batch_wait_s=0.2,
                              max_in_flight=16)

    results = run_all(stages)

    faces = sum(len(r.recognitions) for r in results)
    assert faces == 4 * sum(len(f) for f in detections.values())
    sizes = stages.stats.batch_sizes
    assert sum(size * count for size, count in sizes.items()) == faces
    assert max(sizes) == 4, sizes  # the pipeline's batch size
    assert sizes[4] >= faces // 8, sizes


def test_stages_take_no_more_than_in_flight_bound(pipeline: Pipeline,
                                                  val_inputs: list[tuple[str, np.ndarray]]):
    frames_taken = 0
    source = memory_source(val_inputs)

    def take(timeout_s: float) -> object:
        nonlocal frames_taken
        item = source(timeout_s)
        if isinstance(item, Frame):
            frames_taken += 1
        return item

    stages = StagedRecognizer(pipeline, [pipeline.detector], take, max_batch_wait_s=0.0,
                              max_in_flight=3)
    stages.start()
    try:
        # The test takes no results, so the stages must stop taking frames at the bound.
        deadline = time.monotonic() + 30
        while stages.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert frames_taken == 3
        assert stages.in_flight == 3

        first = stages.next_result(60.0)
        assert first is not None and first.frame is not None
        assert first.frame.source == val_inputs[0][0]
        deadline = time.monotonic() + 30
        while frames_taken < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert frames_taken == 4
    finally:
        assert stages.close() == 3


def test_stages_skip_frame_that_fails_detection(pipeline: Pipeline,
                                                val_inputs: list[tuple[str, np.ndarray]]):
    name, image = val_inputs[0]
    frames = iter([Frame("grey.png", 0, 0.0, np.zeros((40, 40), dtype=np.uint8)),
                   Frame("unreadable.jpg", 1, 0.0, None, error="truncated JPEG"),
                   Frame(name, 2, 0.0, image)])

    stages = StagedRecognizer(pipeline, [pipeline.detector],
                              lambda timeout_s: next(frames, END_OF_SOURCE),
                              max_batch_wait_s=0.0, max_in_flight=4)
    results = run_all(stages)

    assert [r.frame.source for r in results if r.frame] == ["grey.png", "unreadable.jpg", name]
    error = results[0].error
    assert error is not None
    assert "detection failed" in error
    assert "(40, 40)" in error  # the shape that was rejected
    assert results[1].error == "truncated JPEG"
    assert results[2].error is None
    assert results[2].recognitions


def test_stages_report_stall_while_detection_hangs(pipeline: Pipeline,
                                                   val_inputs: list[tuple[str, np.ndarray]]):
    release = threading.Event()

    class HungDetector:
        def detect(self, image: np.ndarray) -> list:
            release.wait(30)
            return []

    frames = memory_source(val_inputs[:1])
    source_open = threading.Event()

    def take(timeout_s: float) -> object:
        # The frame comes only after the stages have idled, which must not count
        # as a stall.
        if not source_open.wait(timeout_s):
            return None
        return frames(timeout_s)

    stages = StagedRecognizer(pipeline, [HungDetector()], take, max_batch_wait_s=0.0,
                              max_in_flight=2)
    stages.start()
    try:
        time.sleep(1.0)
        source_open.set()
        deadline = time.monotonic() + 10
        while stages.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stages.stalled_for() < 0.5
        time.sleep(0.5)
        assert stages.stalled_for() >= 0.5
        release.set()
        result = stages.next_result(10.0)
        assert result is not None and result.frame is not None
        assert stages.stalled_for() == 0.0
    finally:
        release.set()
        stages.close()


def test_overload_drops_counted_nothing_lost(pipeline: Pipeline,
                                             val_inputs: list[tuple[str, np.ndarray]]):
    # 200 frames/s is far above what two cores recognise. Every offered frame
    # must be either processed or counted as dropped.
    report = measure_overload(pipeline, pipeline.config, val_inputs[:5], fps=200.0,
                              seconds=2.0)

    assert report["frames_dropped"] > 0
    assert report["frames_processed"] + report["frames_dropped"] == report["frames_offered"]


@pytest.mark.parametrize(("threads", "raw", "expected"), [
    (2, {}, 1),                                   # two workers beside it: half the cores
    (4, {}, 2),
    (1, {}, 1),                                   # one worker: every thread
    (4, {"service": {"detect_workers": 1}}, 4),
    (2, {"runtime": {"embedder_threads": 2}}, 2),  # set by the operator
])
def test_embedder_threads_beside_detect_workers(threads: int, raw: dict, expected: int):
    config = parse_config({"device_id": "stages", **raw})
    choice = StageChoice("tflite", "int8", (), 16)
    selection = Selection(choice, StageChoice("onnxruntime", "fp32"), threads, "config")

    assert embedder_threads(config, selection) == expected
