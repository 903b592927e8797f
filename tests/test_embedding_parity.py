"""The agent's embeddings on detected val faces equal the Keras reference model's.

The crops come from the agent's own detector and crop step, and both models see
the same pixels. The reference is the Keras rebuild of facenet_keras.h5, so this
checks the ONNX conversion, the prewhitening and the L2 normalisation together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.align import crop_face
from agent.config import parse_config
from agent.images import read_image
from agent.pipeline import build_pipeline

TOLERANCE = 1e-4  # max absolute difference per embedding value


def reference_prewhiten(crops: np.ndarray) -> np.ndarray:
    """davidsandberg/facenet's formula, written out again so the test does not trust agent.align."""
    out = []
    for crop in crops.astype(np.float64):
        std_floor = max(crop.std(), 1.0 / np.sqrt(crop.size))
        out.append((crop - crop.mean()) / std_floor)
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def val_crops(model_dir: Path, example_data: Path, tmp_path_factory: pytest.TempPathFactory):
    gallery = tmp_path_factory.mktemp("parity") / "gallery.db"
    config = parse_config({
        "device_id": "parity",
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(gallery)},
    })
    pipeline = build_pipeline(config)
    crops = []
    for photo in sorted((example_data / "val").glob("*/*.jpg")):
        image = read_image(photo)
        for face in pipeline.detector.detect(image):
            crops.append(crop_face(image, face.bbox, config.alignment.margin, 160))
    assert len(crops) >= 25
    return pipeline, np.stack(crops)


@pytest.mark.slow
def test_agent_embeddings_match_keras(val_crops, keras_facenet) -> None:
    pipeline, crops = val_crops

    actual = pipeline.embedder.embed(crops)
    raw = keras_facenet.predict(reference_prewhiten(crops), batch_size=8, verbose=0)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)

    difference = float(np.max(np.abs(actual - expected)))
    print(f"{len(crops)} detected val faces: max abs difference {difference:.3g}")
    assert difference < TOLERANCE


@pytest.mark.slow
def test_raw_onnx_output_matches_keras(val_crops, keras_facenet) -> None:
    pipeline, crops = val_crops
    batch = reference_prewhiten(crops)

    actual = pipeline.embedder.session.run(batch)["embedding"]
    expected = keras_facenet.predict(batch, batch_size=8, verbose=0)

    assert float(np.max(np.abs(actual - expected))) < TOLERANCE
