"""Tests for `models build`: converted ONNX models against Keras references, and the manifest.

Slow tests load TensorFlow to run the reference networks: the mtcnn 1.0.0
package's own Keras classes, and the Keras rebuild of facenet_keras.h5.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest

from agent.models import fetch, mtcnn_onnx
from agent.models.fetch import FetchError, fetch_mtcnn_wheel
from agent.models.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    load_manifest,
    write_manifest,
)

TOLERANCE = 1e-4


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot decode {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def val_photos(example_data: Path) -> list[Path]:
    photos = sorted((example_data / "val").glob("*/*.jpg"))
    assert len(photos) >= 20, f"expected the 25 val photos under {example_data / 'val'}"
    return photos


def mtcnn_normalize(rgb: np.ndarray) -> np.ndarray:
    # mtcnn 1.0.0 utils/images.normalize_images
    return ((rgb.astype(np.float32) - 127.5) / 128).astype(np.float32)


def center_crops(photos: list[Path], size: int) -> np.ndarray:
    """Square crops of the central 60% of each photo, where these photos show the face."""
    crops = []
    for path in photos:
        rgb = read_rgb(path)
        height, width = rgb.shape[:2]
        side = int(min(height, width) * 0.6)
        top, left = (height - side) // 2, (width - side) // 2
        crop = rgb[top:top + side, left:left + side]
        crops.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR))
    return mtcnn_normalize(np.stack(crops))


def run_onnx(model_bytes: bytes, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": batch}), strict=True))


# MTCNN


@pytest.fixture(scope="session")
def mtcnn_package(download_cache: Path) -> Path:
    return fetch_mtcnn_wheel(download_cache)


@pytest.fixture(scope="session")
def mtcnn_onnx_models(model_dir: Path) -> dict[str, bytes]:
    """The built MTCNN .onnx files, as bytes keyed by stage."""
    return {stage: (model_dir / f"{stage}.onnx").read_bytes() for stage in ("pnet", "rnet", "onet")}


@pytest.fixture(scope="session")
def mtcnn_keras(mtcnn_package: Path):
    """The mtcnn 1.0.0 Keras networks with their shipped weights, keyed by stage."""
    sys.path.insert(0, str(mtcnn_package.parent))
    try:
        from mtcnn.network.onet import ONet
        from mtcnn.network.pnet import PNet
        from mtcnn.network.rnet import RNet
        from mtcnn.utils.tensorflow import load_weights
    finally:
        sys.path.remove(str(mtcnn_package.parent))
    assert Path(sys.modules["mtcnn"].__file__).parent == mtcnn_package

    networks = {}
    weights_dir = mtcnn_package / "assets" / "weights"
    for stage, network_class in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
        network = network_class()
        network.build()
        network.set_weights(load_weights(str(weights_dir / f"{stage}.lz4")))
        networks[stage] = network
    return networks


def assert_outputs_match(stage, keras_outputs, onnx_outputs) -> None:
    for name, expected in zip(mtcnn_onnx.OUTPUT_NAMES[stage], keras_outputs, strict=True):
        expected = np.asarray(expected)
        actual = onnx_outputs[name]
        assert actual.shape == expected.shape, f"{stage} {name}: shape"
        difference = float(np.max(np.abs(actual - expected)))
        print(f"{stage} {name} {actual.shape}: max abs difference {difference:.3g}")
        assert difference < TOLERANCE, f"{stage} {name}: max abs difference {difference}"


def test_mtcnn_output_contract(mtcnn_onnx_models):
    for stage, model_bytes in mtcnn_onnx_models.items():
        session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["input"], stage
        outputs = tuple(o.name for o in session.get_outputs())
        assert outputs == mtcnn_onnx.OUTPUT_NAMES[stage], stage


@pytest.mark.parametrize(
    ("height", "width", "expected_hw"),
    [(12, 12, (1, 1)), (13, 17, (2, 4)), (300, 200, (145, 95)), (301, 203, (146, 97))],
)
def test_pnet_map_size(mtcnn_onnx_models, height, width, expected_hw):
    batch = np.zeros((2, height, width, 3), dtype=np.float32)
    outputs = run_onnx(mtcnn_onnx_models["pnet"], batch)
    assert outputs["bbox_reg"].shape == (2, *expected_hw, 4)
    assert outputs["bbox_class"].shape == (2, *expected_hw, 2)


@pytest.mark.slow
def test_pnet_matches_keras(mtcnn_keras, mtcnn_onnx_models, example_data):
    # Odd sizes exercise the extra bottom/right pixel of 'same' max pooling.
    for path in val_photos(example_data)[:4]:
        image = mtcnn_normalize(read_rgb(path))
        for batch in (image[None], image[None, :251, :173]):
            keras_outputs = mtcnn_keras["pnet"](batch)
            assert_outputs_match("pnet", keras_outputs, run_onnx(mtcnn_onnx_models["pnet"], batch))


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "size"), [("rnet", 24), ("onet", 48)])
def test_refine_stage_matches_keras(mtcnn_keras, mtcnn_onnx_models, example_data, stage, size):
    batch = center_crops(val_photos(example_data), size)
    keras_outputs = mtcnn_keras[stage](batch)
    assert_outputs_match(stage, keras_outputs, run_onnx(mtcnn_onnx_models[stage], batch))


def test_onet_landmark_layout(mtcnn_onnx_models, example_data):
    """Landmarks are x1..x5 then y1..y5 for an upright, untransposed face crop."""
    batch = center_crops(val_photos(example_data), 48)
    landmarks = run_onnx(mtcnn_onnx_models["onet"], batch)["landmarks"]
    x, y = landmarks[:, :5], landmarks[:, 5:]
    left_eye, right_eye, nose, mouth_left, mouth_right = range(5)

    assert np.all(x[:, left_eye] < x[:, right_eye])
    assert np.all(x[:, mouth_left] < x[:, mouth_right])
    assert np.all(np.maximum(y[:, left_eye], y[:, right_eye]) < y[:, nose])
    assert np.all(y[:, nose] < np.minimum(y[:, mouth_left], y[:, mouth_right]))
    assert np.all((landmarks > 0) & (landmarks < 1)), "landmarks are fractions of the crop"


# FaceNet


def prewhiten(image: np.ndarray) -> np.ndarray:
    """(x - mean) / max(std, 1/sqrt(N)) over one image, N = number of values."""
    values = image.astype(np.float64)
    std = max(values.std(), 1.0 / np.sqrt(values.size))
    return ((values - values.mean()) / std).astype(np.float32)


def prewhitened_val_faces(example_data: Path) -> np.ndarray:
    faces = [
        prewhiten(cv2.resize(read_rgb(path), (160, 160), interpolation=cv2.INTER_AREA))
        for path in val_photos(example_data)
    ]
    return np.stack(faces)


@pytest.mark.slow
def test_keras_facenet_parameter_count(keras_facenet):
    assert keras_facenet.count_params() == 22_808_144
    assert tuple(keras_facenet.input_shape) == (None, 160, 160, 3)
    assert tuple(keras_facenet.output_shape) == (None, 128)


@pytest.mark.slow
def test_facenet_onnx_matches_keras(keras_facenet, model_dir, example_data):
    batch = prewhitened_val_faces(example_data)
    expected = keras_facenet.predict(batch, batch_size=8, verbose=0)
    actual = run_onnx((model_dir / "facenet.onnx").read_bytes(), batch)["embedding"]

    assert actual.shape == (len(batch), 128)
    difference = float(np.max(np.abs(actual - expected)))
    print(f"facenet embedding {actual.shape}: max abs difference {difference:.3g}")
    assert difference < TOLERANCE


def test_facenet_embedding_not_normalised(model_dir, example_data):
    batch = prewhitened_val_faces(example_data)[:4]
    embedding = run_onnx((model_dir / "facenet.onnx").read_bytes(), batch)["embedding"]
    norms = np.linalg.norm(embedding, axis=1)
    assert np.all(np.abs(norms - 1) > 0.1), f"norms {norms} look L2-normalised"


def test_facenet_batch_size_dynamic(model_dir, example_data):
    batch = prewhitened_val_faces(example_data)[:3]
    model = (model_dir / "facenet.onnx").read_bytes()
    together = run_onnx(model, batch)["embedding"]
    one_by_one = np.concatenate([run_onnx(model, face[None])["embedding"] for face in batch])
    assert np.max(np.abs(together - one_by_one)) < 1e-5


def embed_center_crops(model: bytes, photos: list[Path]) -> np.ndarray:
    """L2-normalised embeddings of the central 70% square of each photo (no face detection)."""
    faces = []
    for path in photos:
        rgb = read_rgb(path)
        height, width = rgb.shape[:2]
        side = int(min(height, width) * 0.7)
        top, left = (height - side) // 2, (width - side) // 2
        crop = cv2.resize(rgb[top:top + side, left:left + side], (160, 160),
                          interpolation=cv2.INTER_AREA)
        faces.append(prewhiten(crop))
    embeddings = run_onnx(model, np.stack(faces))["embedding"]
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def test_facenet_identifies_val_people(model_dir, example_data):
    """Nearest train photo names the right person for most val photos (chance is 1 in 5).

    Center crops stand in for detected, aligned faces, so this checks that the
    embedding separates people, not how well. 20 of 25 were right when written.
    """
    model = (model_dir / "facenet.onnx").read_bytes()
    train = sorted((example_data / "train").glob("*/*.jpg"))
    val = val_photos(example_data)
    train_embeddings = embed_center_crops(model, train)
    val_embeddings = embed_center_crops(model, val)

    distances = np.linalg.norm(val_embeddings[:, None] - train_embeddings[None], axis=2)
    predicted = [train[i].parent.name for i in distances.argmin(axis=1)]
    correct = sum(p == path.parent.name for p, path in zip(predicted, val, strict=True))
    assert correct >= 15, f"{correct} of {len(val)} val photos matched the right person"


# Manifest


def copy_models(model_dir: Path, destination: Path) -> Path:
    destination.mkdir()
    for path in model_dir.iterdir():
        if path.is_file():
            (destination / path.name).write_bytes(path.read_bytes())
    return destination


def test_manifest_contents(model_dir):
    manifest = load_manifest(model_dir)

    assert manifest.directory == model_dir.resolve()
    assert manifest.model_id == "facenet-20170512-110547-keras"
    assert manifest.embedding_size == 128
    assert manifest.metric == "euclidean"
    assert manifest.threshold == 1.1
    assert manifest.image_size == 160
    assert (manifest.layout, manifest.color_order) == ("NHWC", "RGB")
    assert manifest.preprocessing == "prewhiten"
    assert dict(manifest.mtcnn_normalization) == {"mean": 127.5, "scale": 1 / 128}

    assert manifest.embedder.path == model_dir.resolve() / "facenet.onnx"
    assert manifest.embedder.input_shape == (None, 160, 160, 3)
    assert manifest.embedder.outputs == ("embedding",)
    assert manifest.pnet.input_shape == (None, None, None, 3)
    assert manifest.rnet.input_shape == (None, 24, 24, 3)
    assert manifest.onet.input_shape == (None, 48, 48, 3)
    assert manifest.onet.outputs == ("bbox_reg", "landmarks", "bbox_class")


def test_manifest_matches_onnx_files(model_dir):
    for model in load_manifest(model_dir).model_files():
        session = onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
        (model_input,) = session.get_inputs()
        assert model_input.name == model.input_name, model.role
        shape = tuple(d if isinstance(d, int) else None for d in model_input.shape)
        assert shape == model.input_shape, model.role
        assert tuple(o.name for o in session.get_outputs()) == model.outputs, model.role


def test_manifest_round_trip(model_dir, tmp_path):
    copy = copy_models(model_dir, tmp_path / "models")
    original = load_manifest(copy)
    (copy / MANIFEST_NAME).unlink()

    files = {
        model.role: dataclasses.replace(model, path=copy / model.path.name)
        for model in original.model_files()
    }
    rewritten = dataclasses.replace(original, **files)
    write_manifest(rewritten, provenance={"note": "rewritten by the round-trip test"})
    reloaded = load_manifest(copy)

    assert reloaded == original
    assert isinstance(reloaded, Manifest)


def test_manifest_flipped_byte_rejected(model_dir, tmp_path):
    copy = copy_models(model_dir, tmp_path / "models")
    target = copy / "rnet.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    with pytest.raises(ManifestError) as raised:
        load_manifest(copy)
    message = str(raised.value)
    assert "rnet.onnx" in message
    assert load_manifest(model_dir).rnet.sha256 in message
    assert "facenet-agent models build --out" in message

    # Without verification only presence is checked, so the load succeeds.
    assert load_manifest(copy, verify=False).rnet.path == target.resolve()


def test_manifest_missing_model_file(model_dir, tmp_path):
    copy = copy_models(model_dir, tmp_path / "models")
    (copy / "onet.onnx").unlink()
    with pytest.raises(ManifestError, match="onet.onnx"):
        load_manifest(copy, verify=False)


def test_manifest_missing(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)


def test_manifest_unknown_schema(model_dir, tmp_path):
    copy = copy_models(model_dir, tmp_path / "models")
    document = json.loads((copy / MANIFEST_NAME).read_text())
    document["schema_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(ManifestError, match="schema_version 99"):
        load_manifest(copy, verify=False)


def test_manifest_edited_rejected(model_dir, tmp_path):
    copy = copy_models(model_dir, tmp_path / "models")
    document = json.loads((copy / MANIFEST_NAME).read_text())
    document["embedding"]["threshold"] = 2.0
    (copy / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(ManifestError, match="modified"):
        load_manifest(copy)


def test_manifest_path_outside_directory(model_dir, tmp_path):
    copy = copy_models(model_dir, tmp_path / "models")
    document = json.loads((copy / MANIFEST_NAME).read_text())
    document["models"]["pnet"]["file"] = "../pnet.onnx"
    (copy / MANIFEST_NAME).write_text(json.dumps(document))
    with pytest.raises(ManifestError, match="inside the model directory"):
        load_manifest(copy, verify=False)


def test_manifest_loader_imports(tmp_path):
    """The device-side loader must not pull in build-only packages."""
    code = (
        "import sys; import agent.models.manifest; "
        "heavy = {'onnx', 'h5py', 'tensorflow', 'keras', 'joblib'} & set(sys.modules); "
        "print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Fetching


def test_fetch_rejects_wrong_sha256(tmp_path):
    (tmp_path / fetch.MTCNN_WHEEL.filename).write_bytes(b"not the mtcnn wheel")
    with pytest.raises(FetchError, match="sha256 mismatch") as raised:
        fetch.fetch_archive(fetch.MTCNN_WHEEL, tmp_path)
    assert fetch.MTCNN_WHEEL.sha256 in str(raised.value)
    assert "Delete the file" in str(raised.value)


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, stderr="ERROR: No matching distribution")

    monkeypatch.setattr(fetch.subprocess, "run", failing_pip)
    with pytest.raises(FetchError) as raised:
        fetch.fetch_archive(fetch.MTCNN_WHEEL, tmp_path)
    message = str(raised.value)
    assert "mtcnn==1.0.0" in message
    assert "No matching distribution" in message
    assert fetch.MTCNN_WHEEL.filename in message
