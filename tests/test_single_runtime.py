"""The agent with a single inference package installed: run by scripts/test-runtimes.sh.

That script makes one virtual environment per runtime (only onnxruntime, only
ai-edge-litert, only tensorflow-cpu) and runs this file in each with
FACENET_AGENT_ONLY_RUNTIME set to the runtime's name. In the full environment
the file is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.runtimes import RuntimeNotInstalledError, installed_runtimes

ONLY = os.environ.get("FACENET_AGENT_ONLY_RUNTIME", "")
pytestmark = pytest.mark.skipif(not ONLY, reason="FACENET_AGENT_ONLY_RUNTIME is not set")

# tensorflow also serves TFLite files through tensorflow.lite.
EXPECTED_RUNTIMES = {"onnxruntime": ["onnxruntime"], "tflite": ["tflite"],
                     "tensorflow": ["tflite", "tensorflow"]}
PACKAGES = {"onnxruntime": "onnxruntime", "tflite": "ai_edge_litert", "tensorflow": "tensorflow"}


def config_for(tmp_path: Path, model_dir: Path, runtime: str = "auto"):
    return parse_config({
        "device_id": "single-runtime",
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "runtime": {"name": runtime, "cache_dir": str(tmp_path / "cache")},
        "device": {"profile": "x86_64-generic"},
    })


def test_only_one_runtime_installed():
    assert installed_runtimes() == EXPECTED_RUNTIMES[ONLY]
    for name, package in PACKAGES.items():
        if name not in EXPECTED_RUNTIMES[ONLY]:
            assert importlib.util.find_spec(package) is None, package


def test_missing_runtime_names_package(tmp_path, model_dir):
    from agent.pipeline import build_pipeline

    missing = next(name for name in PACKAGES if name not in EXPECTED_RUNTIMES[ONLY])
    with pytest.raises(RuntimeNotInstalledError, match="pip install"):
        build_pipeline(config_for(tmp_path, model_dir, missing))


@pytest.mark.parametrize("runtime", ["auto", *EXPECTED_RUNTIMES.get(ONLY, [])])
def test_pipeline_recognizes_val_faces(tmp_path, model_dir, example_data, runtime):
    from agent.enroll import enroll_folder
    from agent.images import read_image
    from agent.pipeline import build_pipeline

    pipeline = build_pipeline(config_for(tmp_path, model_dir, runtime))
    # auto takes the first installed runtime in the x86_64-generic profile's order.
    expected = EXPECTED_RUNTIMES[ONLY][0] if runtime == "auto" else runtime
    assert pipeline.embedder.session.runtime == expected
    report = enroll_folder(pipeline, example_data / "train")
    assert len(report.identities) == 5

    photos = sorted((example_data / "val").glob("*/*.jpg"))
    correct = 0
    for photo in photos:
        recognitions = pipeline.recognize(read_image(photo))
        if recognitions:
            best = max(recognitions, key=lambda r: r.face.score)
            correct += best.match.identity_id == photo.parent.name
    print(f"{ONLY} ({runtime}): {correct} of {len(photos)} val photos recognised")
    assert correct >= 20
    pipeline.gallery.close()

    # Nothing loaded another runtime's package on the way.
    for name, package in PACKAGES.items():
        if name not in EXPECTED_RUNTIMES[ONLY]:
            assert package not in sys.modules, package
