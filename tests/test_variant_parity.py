"""Every installed runtime x every built variant against the references.

Embedder: fp32 variants agree with the Keras rebuild of facenet_keras.h5 to a
cosine of 0.9999 per face. Reduced precisions keep each val face's nearest
train identity and a cosine of at least 0.999 (fp16) or 0.99 (int8). MTCNN
stages: every variant agrees with the ONNX fp32 stage, which test_model_build
checks against the mtcnn 1.0.0 Keras networks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.align import prewhiten
from agent.models.manifest import load_manifest
from agent.runtimes import RuntimeOptions, create_runtime, installed_runtimes, runtime_class

MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}
MAX_STAGE_DIFFERENCE = {"fp32": 1e-4, "fp16": 2e-2}


def installed_variants(model_dir: Path, role: str) -> list[tuple[str, object]]:
    manifest = load_manifest(model_dir)
    cases = []
    for runtime in installed_runtimes():
        model_format = runtime_class(runtime).model_format
        for precision in manifest.precisions(role, model_format):
            cases.append((runtime, manifest.variant(role, model_format, precision)))
    return cases


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def face_crops(model_dir: Path, example_data: Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Detected, cropped train and val faces with their identity names."""
    pytest.importorskip("onnxruntime")
    from agent.detect import MtcnnDetector
    from agent.evaluate import detect_faces, identity_photos
    from agent.runtimes import OnnxRuntime

    runtime = OnnxRuntime()
    detector = MtcnnDetector(*(runtime.load(model_dir / f"{stage}.onnx")
                               for stage in ("pnet", "rnet", "onet")))
    crops = {}
    for split in ("train", "val"):
        faces = detect_faces(identity_photos(example_data / split), detector, 0.2, 160)
        crops[split] = (faces.crops, list(faces.labels))
    return crops


@pytest.fixture(scope="module")
def keras_embeddings(download_cache: Path, face_crops) -> dict[str, np.ndarray]:
    pytest.importorskip("tensorflow")
    from agent.models.fetch import fetch_facenet_sdist
    from agent.models.keras_facenet import build_keras_facenet

    model = build_keras_facenet(fetch_facenet_sdist(download_cache) / "model" / "facenet_keras.h5")
    return {split: model.predict(prewhiten(crops), batch_size=16, verbose=0)
            for split, (crops, _) in face_crops.items()}


def embed(runtime: str, path: Path, precision: str, crops: np.ndarray) -> np.ndarray:
    session = create_runtime(runtime, RuntimeOptions(threads=2)).load(path, precision=precision)
    inputs = prewhiten(crops)
    return np.concatenate([session.run(inputs[i:i + 16])["embedding"]
                           for i in range(0, len(inputs), 16)])


def nearest(gallery: np.ndarray, labels: list[str], probes: np.ndarray) -> list[str]:
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    probes = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    distances = np.linalg.norm(probes[:, None] - gallery[None], axis=2)
    return [labels[i] for i in distances.argmin(axis=1)]


@pytest.mark.slow
def test_embedder_variants_match_keras(model_dir, face_crops, keras_embeddings):
    cases = installed_variants(model_dir, "embedder")
    assert cases, "no installed runtime loads any embedder variant"
    train_crops, train_labels = face_crops["train"]
    val_crops, _ = face_crops["val"]
    reference = nearest(keras_embeddings["train"], train_labels, keras_embeddings["val"])

    for runtime, variant in cases:
        label = f"{runtime} {variant.precision} {variant.path.name}"
        val = embed(runtime, variant.path, variant.precision, val_crops)
        worst = float(cosine(val, keras_embeddings["val"]).min())
        print(f"{label}: min cosine to Keras {worst:.6f}")
        assert worst >= MIN_COSINE[variant.precision], label
        if variant.precision != "fp32":
            train = embed(runtime, variant.path, variant.precision, train_crops)
            assert nearest(train, train_labels, val) == reference, label


def test_detector_variants_match_onnx(model_dir, example_data):
    pytest.importorskip("onnxruntime")
    from agent.runtimes import OnnxRuntime

    rng = np.random.default_rng(0)
    inputs = {"pnet": rng.uniform(-1, 1, (1, 67, 93, 3)).astype(np.float32),
              "rnet": rng.uniform(-1, 1, (7, 24, 24, 3)).astype(np.float32),
              "onet": rng.uniform(-1, 1, (3, 48, 48, 3)).astype(np.float32)}
    checked = 0
    for stage, batch in inputs.items():
        expected = OnnxRuntime().load(model_dir / f"{stage}.onnx").run(batch)
        for runtime, variant in installed_variants(model_dir, stage):
            actual = create_runtime(runtime).load(variant.path).run(batch)
            assert set(actual) == set(expected), f"{runtime} {variant.path.name}"
            for name, value in expected.items():
                difference = float(np.max(np.abs(actual[name] - value)))
                assert actual[name].shape == value.shape, f"{variant.path.name} {name}"
                assert difference < MAX_STAGE_DIFFERENCE[variant.precision], (
                    f"{runtime} {variant.path.name} {name}: {difference}")
            checked += 1
    assert checked >= 3
