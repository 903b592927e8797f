"""Tests for agent.detect: the MTCNN cascade on the ONNX models.

The parity tests run `mtcnn.MTCNN().detect_faces` from the pinned mtcnn 1.0.0
wheel as the independent reference. It loads TensorFlow, so they are marked slow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.detect import (
    Face,
    MtcnnDetector,
    box_overlap,
    build_pyramid,
    extract_patches,
    generate_candidates,
    nms,
    square_boxes,
)
from agent.runtimes import OnnxRuntime

# One frontal face in a 320x240 (4:3) photo, so it also upscales to 8000x6000
# without distortion.
BORDER_PHOTO = "mindy_kaling/httpcdnpastemagazinecomwwwarticlesmindyprojectjpg.jpg"
MIN_BOX_IOU = 0.9
MAX_LANDMARK_ERROR_PX = 2.0


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cannot decode {path}"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two x1, y1, x2, y2 boxes, written out here so it does not test itself."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return float(intersection / union)


def best_match(faces: list[Face], box: np.ndarray) -> tuple[Face, float]:
    best = max(faces, key=lambda face: iou(face.bbox, box))
    return best, iou(best.bbox, box)


@pytest.fixture(scope="module")
def detector(model_dir: Path) -> MtcnnDetector:
    runtime = OnnxRuntime()
    return MtcnnDetector(
        runtime.load(model_dir / "pnet.onnx"),
        runtime.load(model_dir / "rnet.onnx"),
        runtime.load(model_dir / "onet.onnx"),
    )


@pytest.fixture(scope="module")
def val_photos(example_data: Path) -> list[Path]:
    photos = sorted((example_data / "val").glob("*/*.jpg"))
    assert len(photos) == 25, f"expected the 25 val photos under {example_data / 'val'}"
    return photos


@pytest.fixture(scope="module")
def border_photo(example_data: Path) -> np.ndarray:
    return read_rgb(example_data / "val" / BORDER_PHOTO)


@pytest.fixture(scope="module")
def reference_detections(download_cache: Path, val_photos: list[Path]) -> dict[str, np.ndarray]:
    """mtcnn 1.0.0 detections per photo name, as rows of the package's numpy output.

    Each row is image index, x1, y1, x2, y2, confidence, five landmark x, five landmark y.
    """
    from agent.models.fetch import fetch_mtcnn_wheel

    sys.path.insert(0, str(fetch_mtcnn_wheel(download_cache).parent))
    try:
        from mtcnn import MTCNN
    finally:
        sys.path.pop(0)

    reference = MTCNN()
    return {
        path.name: reference.detect_faces(read_rgb(path), box_format="xyxy", output_type="numpy")
        for path in val_photos
    }


@pytest.fixture(scope="module")
def detections(detector: MtcnnDetector, val_photos: list[Path]) -> dict[str, list[Face]]:
    return {path.name: detector.detect(read_rgb(path)) for path in val_photos}


# Parity with the mtcnn package


@pytest.mark.slow
def test_face_count_matches_reference(reference_detections, detections):
    for name, expected in reference_detections.items():
        assert len(detections[name]) == len(expected), name


@pytest.mark.slow
def test_boxes_match_reference(reference_detections, detections):
    for name, expected in reference_detections.items():
        for row in expected:
            assert detections[name], f"{name}: no faces detected"
            _, overlap = best_match(detections[name], row[1:5])
            assert overlap >= MIN_BOX_IOU, f"{name}: reference box {row[1:5]} has IoU {overlap}"


@pytest.mark.slow
def test_landmarks_match_reference(reference_detections, detections):
    for name, expected in reference_detections.items():
        for row in expected:
            assert detections[name], f"{name}: no faces detected"
            face, _ = best_match(detections[name], row[1:5])
            reference_points = np.stack([row[6:11], row[11:16]], axis=1)
            error = np.abs(face.landmarks - reference_points).max()
            assert error <= MAX_LANDMARK_ERROR_PX, f"{name}: landmark error {error} px"


@pytest.mark.slow
def test_scores_match_reference(reference_detections, detections):
    for name, expected in reference_detections.items():
        for row in expected:
            assert detections[name], f"{name}: no faces detected"
            face, _ = best_match(detections[name], row[1:5])
            assert face.score == pytest.approx(row[5], abs=1e-3), name


# Detector behaviour


def test_face_fields(detector, border_photo):
    faces = detector.detect(border_photo)

    assert len(faces) == 1
    face = faces[0]
    assert face.bbox.shape == (4,)
    assert face.bbox.dtype == np.float32
    assert face.landmarks.shape == (5, 2)
    assert face.landmarks.dtype == np.float32
    assert 0.8 < face.score <= 1.0
    x1, y1, x2, y2 = face.bbox
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < right_eye[0]
    assert mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2))
    assert np.all((face.landmarks[:, 1] > y1) & (face.landmarks[:, 1] < y2))


def test_face_arrays_read_only(detector, border_photo):
    face = detector.detect(border_photo)[0]

    with pytest.raises(ValueError):
        face.bbox[0] = 0.0
    with pytest.raises(ValueError):
        face.landmarks[0, 0] = 0.0


@pytest.mark.parametrize("value", [0, 127, 255])
def test_blank_image_no_faces(detector, value):
    image = np.full((480, 640, 3), value, dtype=np.uint8)

    assert detector.detect(image) == []


@pytest.mark.parametrize("side", [1, 5, 11])
def test_tiny_image_no_faces(detector, side):
    image = np.full((side, side, 3), 128, dtype=np.uint8)

    assert detector.detect(image) == []


def test_empty_image_no_faces(detector):
    assert detector.detect(np.zeros((0, 0, 3), dtype=np.uint8)) == []


@pytest.mark.parametrize("edge", ["left", "top"])
def test_face_cut_by_border_found(detector, border_photo, edge):
    whole = detector.detect(border_photo)[0].bbox
    x1, y1, x2, y2 = whole
    # Cut away the outer 30% of the face, through an eye or the forehead.
    if edge == "left":
        cut = int(x1 + 0.3 * (x2 - x1))
        image = border_photo[:, cut:]
        visible = np.array([0.0, y1, x2 - cut, y2])
    else:
        cut = int(y1 + 0.3 * (y2 - y1))
        image = border_photo[cut:]
        visible = np.array([x1, 0.0, x2, y2 - cut])
    height, width = image.shape[:2]

    faces = detector.detect(image)

    assert len(faces) == 1
    box = faces[0].bbox
    assert box[0] >= 0.0
    assert box[1] >= 0.0
    assert box[2] <= width - 1
    assert box[3] <= height - 1
    edge_coordinate = box[0] if edge == "left" else box[1]
    assert edge_coordinate == 0.0, "the box should reach past the border and be clipped"
    assert iou(box, visible) >= 0.7


def test_large_photo_boxes_in_original_pixels(detector, border_photo):
    height, width = border_photo.shape[:2]
    factor = 25  # 320x240 -> 8000x6000
    large = cv2.resize(
        border_photo, (width * factor, height * factor), interpolation=cv2.INTER_CUBIC
    )
    expected = detector.detect(border_photo)[0]

    faces = detector.detect(large)

    assert len(faces) == 1
    assert iou(faces[0].bbox, expected.bbox * factor) >= 0.85
    # 80 px is 1% of the 8000 px width and 3.2 px in the 320 px photo.
    assert np.abs(faces[0].landmarks - expected.landmarks * factor).max() < 80


def test_cap_downscales_longer_side(detector, border_photo):
    capped = MtcnnDetector(detector.pnet, detector.rnet, detector.onet, max_input_side=160)
    expected = detector.detect(border_photo)[0]

    faces = capped.detect(border_photo)

    assert len(faces) == 1
    assert iou(faces[0].bbox, expected.bbox) >= 0.85


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((20, 20), dtype=np.uint8),
        np.zeros((20, 20, 4), dtype=np.uint8),
        np.zeros((20, 20, 3), dtype=np.float32),
    ],
    ids=["grayscale", "rgba", "float32"],
)
def test_invalid_image_rejected(detector, image):
    with pytest.raises(ValueError):
        detector.detect(image)


def test_non_array_image_rejected(detector):
    with pytest.raises(TypeError):
        detector.detect([[[0, 0, 0]]])


@pytest.mark.parametrize(
    "options",
    [
        {"min_face_size": 0},
        {"scale_factor": 1.0},
        {"thresholds": (0.6, 0.7)},
        {"thresholds": (0.6, 0.7, 1.5)},
        {"max_input_side": 8},
    ],
)
def test_invalid_options_rejected(detector, options):
    with pytest.raises(ValueError):
        MtcnnDetector(detector.pnet, detector.rnet, detector.onet, **options)


# Box arithmetic, against hand-computed values


def test_overlap_union_is_iou():
    a = np.array([[0.0, 0.0, 10.0, 10.0]])
    b = np.array([[5.0, 0.0, 15.0, 10.0], [2.0, 2.0, 6.0, 6.0], [20.0, 20.0, 30.0, 30.0]])

    overlap = box_overlap(a, b, "union")

    # 50 / (100 + 100 - 50), then 16 / 100 for the nested box and 0 for the disjoint one.
    np.testing.assert_allclose(overlap, [[1 / 3, 0.16, 0.0]])


def test_overlap_min_divides_by_smaller_area():
    a = np.array([[0.0, 0.0, 10.0, 10.0]])
    b = np.array([[5.0, 0.0, 15.0, 10.0], [2.0, 2.0, 6.0, 6.0], [20.0, 20.0, 30.0, 30.0]])

    overlap = box_overlap(a, b, "min")

    # 50 / 100, then 16 / 16 for the nested box and 0 for the disjoint one.
    np.testing.assert_allclose(overlap, [[0.5, 1.0, 0.0]])


def test_overlap_zero_area_boxes():
    point = np.array([[3.0, 3.0, 3.0, 3.0]])

    assert box_overlap(point, point, "union")[0, 0] == 0.0
    assert box_overlap(point, point, "min")[0, 0] == 0.0


def test_overlap_invalid_method_rejected():
    box = np.array([[0.0, 0.0, 1.0, 1.0]])

    with pytest.raises(ValueError):
        box_overlap(box, box, "max")


def test_nms_threshold_is_exclusive():
    # IoU of the two boxes is 50 / 150 = 1/3.
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]])

    assert nms(boxes, 0.3).tolist() == [0]
    assert nms(boxes, 0.34).tolist() == [0, 1]


def test_nms_min_drops_nested_box():
    # IoU 16 / 100 = 0.16 keeps the nested box, but its min overlap 16 / 16 = 1 drops it.
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 6.0, 6.0]])

    assert nms(boxes, 0.7, "union").tolist() == [0, 1]
    assert nms(boxes, 0.7, "min").tolist() == [0]


def test_nms_dropped_box_still_suppresses():
    # IoU(a, b) = IoU(b, c) = 40 / 160 = 0.25 and IoU(a, c) = 0. Greedy NMS would
    # keep a and c. mtcnn 1.0.0 also lets the dropped b drop c.
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [6.0, 0.0, 16.0, 10.0], [12.0, 0.0, 22.0, 10.0]])

    assert nms(boxes, 0.2).tolist() == [0]
    assert nms(boxes, 0.3).tolist() == [0, 1, 2]


def test_nms_blocks_agree_with_full_matrix():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 400, size=(700, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(10, 60, size=(700, 2))], axis=1)

    overlap = box_overlap(boxes, boxes)
    expected = np.flatnonzero(~np.triu(overlap > 0.5, k=1).any(axis=0))

    np.testing.assert_array_equal(nms(boxes, 0.5), expected)


def test_nms_empty():
    assert nms(np.empty((0, 4)), 0.5).tolist() == []


def test_pyramid_scales():
    scales = build_pyramid(300, 200, min_face_size=20, scale_factor=0.709)

    assert scales[0] == pytest.approx(0.6)
    np.testing.assert_allclose(scales[1:] / scales[:-1], 0.709)
    assert int(200 * scales[-1]) >= 12
    assert int(200 * scales[-1] * 0.709) < 12


def test_pyramid_empty_below_window():
    assert build_pyramid(11, 500, min_face_size=12, scale_factor=0.709).size == 0
    assert build_pyramid(12, 500, min_face_size=12, scale_factor=0.709).tolist() == [1.0]


def test_candidates_from_pnet_map():
    bbox_class = np.zeros((1, 2, 3, 2), dtype=np.float32)
    bbox_class[0, 1, 2, 1] = 0.9
    bbox_class[0, 0, 0, 1] = 0.5
    bbox_reg = np.zeros((1, 2, 3, 4), dtype=np.float32)
    bbox_reg[0, 1, 2] = [0.1, 0.0, 0.0, -0.1]

    boxes, scores = generate_candidates(bbox_reg, bbox_class, scale=0.5, threshold=0.6)

    # Cell (row 1, col 2) spans x 5..16 and y 3..14 in the scaled image. Offsets are
    # in units of 11 px, and dividing by the 0.5 scale doubles every coordinate.
    np.testing.assert_allclose(boxes, [[12.2, 6.0, 32.0, 25.8]], atol=1e-5)
    np.testing.assert_allclose(scores, [0.9], atol=1e-6)


def test_square_boxes_keep_centre():
    boxes = np.array([[0.0, 0.0, 10.0, 4.0], [0.0, 0.0, 2.0, 8.0]])

    np.testing.assert_allclose(square_boxes(boxes), [[0, -3, 10, 7], [-3, 0, 5, 8]])


def test_patches_pad_outside_image_with_zero():
    image = np.ones((10, 10, 3), dtype=np.float32)
    # The part of this box right of the last pixel column (x = 9) lies outside the image.
    boxes = np.array([[4.5, 0.0, 13.5, 9.0]])

    patch = extract_patches(image, boxes, 10)[0]

    assert patch.shape == (10, 10, 3)
    assert np.all(patch[:, :5] == 1.0)
    assert np.all(patch[:, 6:] == 0.0)
