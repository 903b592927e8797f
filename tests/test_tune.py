"""Tuning choice: the knee rule, rejections, the accuracy gate and the cache, without timing."""

from __future__ import annotations

import pytest

from agent.tune import (
    Measurement,
    Selection,
    StageChoice,
    TuneResult,
    choose,
    choose_detector,
    detector_layout,
    gate_reason,
    load_result,
    save_result,
)


def point(runtime: str, precision: str, batch: int, ms: float, rejected: str = "") -> Measurement:
    return Measurement("embedder", runtime, precision, batch, ms, ms * batch, 100.0, None,
                       rejected)


def test_choose_smallest_batch_near_best():
    points = [point("tflite", "int8", 1, 10.0), point("tflite", "int8", 8, 7.4),
              point("tflite", "int8", 32, 7.2), point("onnxruntime", "fp32", 32, 14.0)]
    chosen = choose(points, tolerance=0.05)
    assert (chosen.runtime, chosen.batch_size) == ("tflite", 8)


def test_choose_skips_rejected_points():
    points = [point("tflite", "int8", 8, 4.0, rejected="over the memory budget"),
              point("onnxruntime", "fp32", 8, 14.0)]
    assert choose(points, tolerance=0.05).runtime == "onnxruntime"


def test_choose_all_rejected_raises():
    with pytest.raises(ValueError, match="every tuning point was rejected: too slow"):
        choose([point("tflite", "fp32", 8, 30.0, rejected="too slow")], tolerance=0.05)


def test_choose_detector_prefers_profile_order_within_tolerance():
    # Profile order: onnxruntime, tflite, tensorflow; tensorflow is 1.3 % faster than tflite.
    points = [Measurement("detector", "onnxruntime", "fp32", 1, 44.2, 44.2, 20.0),
              Measurement("detector", "tflite", "fp32", 1, 30.6, 30.6, 20.0),
              Measurement("detector", "tensorflow", "fp32", 1, 30.2, 30.2, 400.0)]
    assert choose_detector(points, tolerance=0.03).runtime == "tflite"
    assert choose_detector(points, tolerance=0.0).runtime == "tensorflow"


def test_choose_detector_skips_rejected():
    points = [Measurement("detector", "tflite", "fp16", 1, 20.0, 20.0, 20.0, None,
                          "finds [1] faces, fp32 finds [2]"),
              Measurement("detector", "tflite", "fp32", 1, 30.6, 30.6, 20.0)]
    assert choose_detector(points, tolerance=0.03).precision == "fp32"


@pytest.mark.parametrize(("accuracy", "reference", "precision", "passes"), [
    (98.5, 98.9, "int8", True),
    (98.3, 98.9, "int8", False),
    (None, 98.9, "int8", False),
    (None, None, "fp32", True),
])
def test_accuracy_gate(accuracy, reference, precision, passes):
    assert (gate_reason(accuracy, reference, precision, 0.5) == "") is passes


def test_cache_round_trip(tmp_path):
    selection = Selection(StageChoice("tflite", "int8", ("xnnpack",), 8),
                          StageChoice("onnxruntime", "fp32", ()), threads=2, origin="tuned")
    choice = point("tflite", "int8", 8, 7.4)
    save_result(tmp_path, TuneResult(selection, (choice,), "abc123", "x86_64-generic", choice))
    loaded = load_result(tmp_path, "abc123")
    assert loaded is not None
    assert loaded.embedder == selection.embedder
    assert loaded.detector == selection.detector
    assert loaded.origin == "cache"
    assert load_result(tmp_path, "other-key") is None


@pytest.mark.parametrize(("threads", "setting", "layout"), [
    (1, 0, (1, 1)),
    (2, 0, (2, 1)),
    (4, 0, (2, 2)),
    (6, 0, (2, 3)),
    (8, 4, (4, 2)),
    (2, 4, (4, 1)),
])
def test_detector_layout_splits_cores(threads: int, setting: int, layout: tuple[int, int]):
    assert detector_layout(threads, setting) == layout
