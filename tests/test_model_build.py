"""Tests for `models build`: converted ONNX models against Keras references, and the manifest.

Slow tests load TensorFlow to run the reference networks: the mtcnn 1.0.0
package's own Keras classes, and the Keras rebuild of facenet_keras.h5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
import pytest

from agent.models import mtcnn_onnx
from agent.models.fetch import fetch_mtcnn_wheel

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
def mtcnn_onnx_models(mtcnn_package: Path) -> dict[str, bytes]:
    models = mtcnn_onnx.convert_mtcnn(mtcnn_package / "assets" / "weights")
    return {stage: model.SerializeToString() for stage, model in models.items()}


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
