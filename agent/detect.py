"""MTCNN face detection (P-Net, R-Net, O-Net cascade) on any runtime.

The three networks arrive as loaded `ModelSession` objects, so this module never
imports an inference library. The weights are those of the PyPI package `mtcnn`
1.0.0, and the pre- and post-processing here follows that package's code so that
boxes and landmarks agree with `mtcnn.MTCNN().detect_faces`. The places where
this module deviates from it on purpose carry a NOTE.

Coordinates are in pixels of the image given to `detect`: x to the right, y down.
Network inputs are float32 NHWC with values in [-1, 1], as the networks take them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from agent.runtimes.base import ModelSession

log = logging.getLogger(__name__)

PNET_CELL_SIZE = 12  # P-Net's receptive field, in pixels of the scaled image
PNET_STRIDE = 2  # distance between P-Net output cells, in pixels of the scaled image
RNET_INPUT_SIZE = 24
ONET_INPUT_SIZE = 48

# IoU thresholds of the four NMS passes, from the stage defaults of mtcnn 1.0.0.
PNET_SCALE_NMS_THRESHOLD = 0.5  # within one pyramid scale
PNET_CROSS_SCALE_NMS_THRESHOLD = 0.7  # across all scales
RNET_NMS_THRESHOLD = 0.7
ONET_NMS_THRESHOLD = 0.7  # with the "min" overlap, not IoU
# Rows per block in nms(). Each 256 x 10,000 float64 temporary is 20 MB.
_NMS_BLOCK = 256

Boxes = np.ndarray  # (N, 4) float64 rows of x1, y1, x2, y2 in pixels


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ cannot compare arrays
class Face:
    """One detected face.

    `bbox` contains x1, y1, x2, y2 as float32 pixels, clipped to [0, width - 1] and
    [0, height - 1]. `landmarks` is float32 (5, 2) of x, y pixels in mtcnn's order:
    left eye, right eye, nose, mouth left, mouth right, where left is the image's left.
    Landmarks are not clipped. `score` is O-Net's face probability.
    """

    bbox: np.ndarray
    score: float
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        # frozen=True only blocks reassigning fields, so lock the array contents too.
        self.bbox.setflags(write=False)
        self.landmarks.setflags(write=False)


def normalize_image(image_rgb: np.ndarray) -> np.ndarray:
    """Convert uint8 RGB pixels to the networks' float32 input range, (x - 127.5) / 128."""
    image = image_rgb.astype(np.float32)
    image -= 127.5
    image *= 1.0 / 128.0
    return image


def build_pyramid(height: int, width: int, min_face_size: float, scale_factor: float) -> np.ndarray:
    """Return the image scales that bring faces of every size onto P-Net's 12 px window.

    The first scale maps a `min_face_size` pixel face onto the 12 px window, and each
    next scale is `scale_factor` times the previous one. Scales continue while the
    shorter image side, scaled and truncated to whole pixels, is still >= 12 px.
    Returns float64 scales, largest first. They are empty when the shorter side is
    under `min_face_size` pixels, because no face of that size fits.
    """
    # NOTE: mtcnn 1.0.0 counts round(log(min_side / 12) / log(1 / scale_factor) - 1)
    # scales, which ignores min_face_size. With the defaults that is the same
    # count, except that 86 of the shorter sides from 12 to 5000 px get one extra
    # level here, one whose shorter side is 12 to 17 px. With min_face_size < 12 the
    # reference count would omit the scales for large faces.
    first_scale = PNET_CELL_SIZE / min_face_size
    min_side = min(height, width)
    scales: list[float] = []
    while True:
        # A power rather than a running product, so that the truncated sizes
        # match the float arithmetic of the reference.
        scale = first_scale * scale_factor ** len(scales)
        if int(min_side * scale) < PNET_CELL_SIZE:
            return np.asarray(scales, dtype=np.float64)
        scales.append(scale)


def generate_candidates(
    bbox_reg: np.ndarray, bbox_class: np.ndarray, scale: float, threshold: float
) -> tuple[Boxes, np.ndarray]:
    """Turn one P-Net output map into regressed boxes in input-image pixels.

    `bbox_reg` is (1, h, w, 4) offsets of x1, y1, x2, y2 in units of the window
    width. `bbox_class` is (1, h, w, 2) softmax scores whose channel 1 is the face
    probability. Cells with a probability above `threshold` become boxes. Returns
    boxes and scores sorted by descending score.
    """
    probabilities = bbox_class[0, :, :, 1]
    rows, cols = np.nonzero(probabilities > threshold)
    scores = probabilities[rows, cols].astype(np.float64)
    offsets = bbox_reg[0, rows, cols].astype(np.float64)

    # The window corners and the 11 px regression unit follow mtcnn 1.0.0, whose
    # window spans [stride * i + 1, stride * i + 12] in scaled pixels.
    left = cols * PNET_STRIDE + 1.0
    top = rows * PNET_STRIDE + 1.0
    window = PNET_CELL_SIZE - 1.0
    corners = np.stack([left, top, left + window, top + window], axis=1)
    boxes = (corners + offsets * window) / scale

    return _sort_by_score(boxes, scores)


def box_overlap(boxes_a: Boxes, boxes_b: Boxes, method: str = "union") -> np.ndarray:
    """Return the (M, N) overlaps between each of `boxes_a` (M, 4) and `boxes_b` (N, 4).

    "union" is IoU: intersection area / union area. "min" is intersection area /
    the smaller of the two areas, so a box that lies inside another scores 1.0.
    Areas are (x2 - x1) * (y2 - y1) with no +1, as in mtcnn 1.0.0.
    Degenerate pairs whose denominator is 0 get an overlap of 0.
    """
    a = boxes_a[:, None, :]
    b = boxes_b[None, :, :]
    inter_w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    inter_h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    intersection = np.maximum(inter_w, 0.0) * np.maximum(inter_h, 0.0)

    areas_a = _box_areas(boxes_a)[:, None]
    areas_b = _box_areas(boxes_b)[None, :]
    if method == "union":
        denominator = areas_a + areas_b - intersection
    elif method == "min":
        denominator = np.minimum(areas_a, areas_b)
    else:
        raise ValueError(f"invalid overlap method {method!r}: expected 'union' or 'min'")

    overlap = np.zeros_like(intersection)
    np.divide(intersection, denominator, out=overlap, where=denominator > 0)
    return overlap


def _box_areas(boxes: Boxes) -> np.ndarray:
    widths = np.maximum(boxes[:, 2] - boxes[:, 0], 0.0)
    heights = np.maximum(boxes[:, 3] - boxes[:, 1], 0.0)
    return widths * heights


def order_by_score(scores: np.ndarray) -> np.ndarray:
    """Return the indices that sort `scores` in descending order.

    Ties are rare (5 among the 3,451 P-Net candidates of the 25 example val photos)
    but decide which box NMS keeps. They come out in the order that
    np.argsort(scores)[::-1] gives, as in mtcnn 1.0.0, so NMS keeps the same box.
    """
    return np.argsort(scores)[::-1]


def nms(boxes: Boxes, threshold: float, method: str = "union") -> np.ndarray:
    """Return the indices of the boxes that survive non-maximum suppression, in input order.

    `boxes` must be sorted best first. A box is dropped when its `box_overlap`
    with any earlier box, kept or dropped, is above `threshold`.
    """
    # NOTE: this is the rule of mtcnn 1.0.0, not greedy NMS. In greedy NMS only
    # kept boxes suppress, so a box that overlaps only a dropped box survives.
    # Here it is dropped too, which keeps the candidates identical to the
    # reference and slightly fewer than greedy NMS would keep.
    count = len(boxes)
    dropped = np.zeros(count, dtype=bool)
    positions = np.arange(count)
    # Compare a block of boxes with all boxes at a time, which bounds memory to
    # _NMS_BLOCK x N overlaps instead of the full N x N matrix.
    for start in range(0, count, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, count)
        overlap = box_overlap(boxes[start:stop], boxes[start:], method)
        is_later = positions[start:][None, :] > positions[start:stop][:, None]
        dropped[start:] |= ((overlap > threshold) & is_later).any(axis=0)
    return np.flatnonzero(~dropped)


def _sort_by_score(boxes: Boxes, scores: np.ndarray) -> tuple[Boxes, np.ndarray]:
    order = order_by_score(scores)
    return boxes[order], scores[order]


def square_boxes(boxes: Boxes) -> Boxes:
    """Grow each box to a square with side max(width, height), keeping its centre."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    sides = np.maximum(widths, heights)
    x1 = boxes[:, 0] + (widths - sides) * 0.5
    y1 = boxes[:, 1] + (heights - sides) * 0.5
    return np.stack([x1, y1, x1 + sides, y1 + sides], axis=1)


def regress_boxes(boxes: Boxes, offsets: np.ndarray) -> Boxes:
    """Shift box corners by R-Net or O-Net `offsets` (N, 4), given in box widths and heights.

    Width and height count both edge pixels (x2 - x1 + 1), as in mtcnn 1.0.0.
    """
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    sizes = np.stack([widths, heights, widths, heights], axis=1)
    return boxes + offsets.astype(np.float64) * sizes


def landmarks_to_pixels(boxes: Boxes, landmarks: np.ndarray) -> np.ndarray:
    """Map O-Net's landmark output (N, 10) to (N, 5, 2) x, y pixels.

    O-Net returns the five x values, then the five y values, each as a fraction
    of the input box's size. `boxes` are the boxes that O-Net was run on, before
    regression. The +1 and -1 pixel terms follow mtcnn 1.0.0.
    """
    widths = boxes[:, 2:3] - boxes[:, 0:1] + 1.0
    heights = boxes[:, 3:4] - boxes[:, 1:2] + 1.0
    xs = widths * landmarks[:, 0:5] + boxes[:, 0:1] - 1.0
    ys = heights * landmarks[:, 5:10] + boxes[:, 1:2] - 1.0
    return np.stack([xs, ys], axis=2)


def _sample_axis(
    starts: np.ndarray, ends: np.ndarray, length: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the bilinear sample positions along one image axis for each box.

    Returns, each (N, size): the lower and upper pixel index, the weight of the
    upper pixel, and whether the sample lies inside the image.
    """
    steps = np.arange(size, dtype=np.float64) / (size - 1)
    # tf.image.crop_and_resize takes box corners divided by the image length and
    # multiplies them by (length - 1), so the grid spans [start, end] * (length - 1) / length.
    positions = (starts[:, None] + (ends - starts)[:, None] * steps) * ((length - 1) / length)
    inside = (positions >= 0.0) & (positions <= length - 1)
    lower = np.floor(positions)
    weight = (positions - lower).astype(np.float32)
    lower_index = np.clip(lower, 0, length - 1).astype(np.intp)
    upper_index = np.clip(lower + 1, 0, length - 1).astype(np.intp)
    return lower_index, upper_index, weight, inside


def extract_patches(image: np.ndarray, boxes: Boxes, size: int) -> np.ndarray:
    """Resample each box of a normalized image onto a `size` x `size` grid.

    `image` is (H, W, 3) float32 and `boxes` are in its pixels. Returns (N, size,
    size, 3) float32 patches. Sampling is bilinear and matches
    tf.image.crop_and_resize as mtcnn 1.0.0 calls it, so samples outside the
    image read 0.0. That pads boxes which cross the image border. Because the
    image is already normalized, 0.0 is mid-grey, not black.
    """
    height, width = image.shape[:2]
    y0, y1, wy, inside_y = _sample_axis(boxes[:, 1], boxes[:, 3], height, size)
    x0, x1, wx, inside_x = _sample_axis(boxes[:, 0], boxes[:, 2], width, size)

    # Index a flat (H * W, 3) view with (N, size, size) pixel numbers, which is
    # faster than 2-D fancy indexing and keeps one batch for all boxes.
    pixels = image.reshape(-1, 3)
    row0 = (y0 * width)[:, :, None]
    row1 = (y1 * width)[:, :, None]
    col0 = x0[:, None, :]
    col1 = x1[:, None, :]
    wx = wx[:, None, :, None]
    wy = wy[:, :, None, None]

    top = pixels[row0 + col0]
    top += (pixels[row0 + col1] - top) * wx
    bottom = pixels[row1 + col0]
    bottom += (pixels[row1 + col1] - bottom) * wx
    patches = top + (bottom - top) * wy

    inside = inside_y[:, :, None] & inside_x[:, None, :]
    patches[~inside] = 0.0
    return patches


def clip_boxes(boxes: Boxes, height: int, width: int) -> Boxes:
    """Clip x to [0, width - 1] and y to [0, height - 1], as mtcnn 1.0.0 does."""
    clipped = boxes.copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0.0, width - 1)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0.0, height - 1)
    return clipped


def _validate_image(image_rgb: np.ndarray) -> None:
    if not isinstance(image_rgb, np.ndarray):
        raise TypeError(f"invalid image type {type(image_rgb).__name__}: expected numpy.ndarray")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"invalid image shape {image_rgb.shape}: expected (height, width, 3) RGB")
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"invalid image dtype {image_rgb.dtype}: expected uint8 RGB")


class FaceDetector(Protocol):
    """Anything that finds faces in an RGB image; MtcnnDetector is the one the agent runs."""

    def detect(self, image_rgb: np.ndarray) -> list[Face]: ...


class MtcnnDetector:
    """Face detector that runs the MTCNN cascade on three loaded sessions.

    `pnet`, `rnet` and `onet` take the input named in their session and return
    `bbox_reg` and `bbox_class`, plus `landmarks` for O-Net, laid out as the mtcnn
    1.0.0 Keras networks return them. `min_face_size` is in pixels of the image
    after the `max_input_side` cap. `thresholds` are the minimum face probabilities
    of P-Net, R-Net and O-Net. Images whose longer side exceeds `max_input_side`
    pixels are downscaled before detection, and None disables the cap.
    """

    def __init__(
        self,
        pnet: ModelSession,
        rnet: ModelSession,
        onet: ModelSession,
        *,
        min_face_size: float = 20,
        scale_factor: float = 0.709,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
        max_input_side: int | None = 1280,
    ) -> None:
        if min_face_size <= 0:
            raise ValueError(f"invalid min_face_size {min_face_size}: expected > 0 pixels")
        if not 0.0 < scale_factor < 1.0:
            raise ValueError(f"invalid scale_factor {scale_factor}: expected a value in (0, 1)")
        if len(thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(
                f"invalid thresholds {thresholds}: expected three probabilities in [0, 1]"
            )
        if max_input_side is not None and max_input_side < PNET_CELL_SIZE:
            raise ValueError(
                f"invalid max_input_side {max_input_side}: "
                f"expected None or at least {PNET_CELL_SIZE} pixels"
            )
        self.pnet = pnet
        self.rnet = rnet
        self.onet = onet
        self.min_face_size = min_face_size
        self.scale_factor = scale_factor
        self.thresholds = tuple(thresholds)
        self.max_input_side = max_input_side

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Detect the faces in an (H, W, 3) uint8 RGB image, best score first.

        Returns an empty list when the shorter side, after the max_input_side cap,
        is under min_face_size pixels, or when no candidate survives a stage.
        Raises TypeError or ValueError for other input types, shapes or dtypes.
        """
        _validate_image(image_rgb)
        height, width = image_rgb.shape[:2]
        small, x_ratio, y_ratio = self._cap_size(image_rgb)
        image = normalize_image(small)

        boxes = self._run_pnet(image)
        if len(boxes) > 0:
            boxes = self._run_rnet(image, boxes)
        if len(boxes) == 0:
            return []
        boxes, scores, landmarks = self._run_onet(image, boxes)

        # Map from the capped image back to the caller's pixels.
        boxes = boxes * (x_ratio, y_ratio, x_ratio, y_ratio)
        landmarks = landmarks * (x_ratio, y_ratio)
        boxes = clip_boxes(boxes, height, width)
        return [
            Face(
                bbox=box.astype(np.float32),
                score=float(score),
                landmarks=points.astype(np.float32),
            )
            for box, score, points in zip(boxes, scores, landmarks, strict=True)
        ]

    def _cap_size(self, image_rgb: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Downscale so the longer side is at most max_input_side.

        Returns the image and the original-to-returned ratios along x and y.
        """
        height, width = image_rgb.shape[:2]
        longer = max(height, width)
        if self.max_input_side is None or longer <= self.max_input_side:
            return image_rgb, 1.0, 1.0
        scale = self.max_input_side / longer
        new_width = max(1, round(width * scale))
        new_height = max(1, round(height * scale))
        small = cv2.resize(
            np.ascontiguousarray(image_rgb), (new_width, new_height), interpolation=cv2.INTER_AREA
        )
        log.debug("downscaled %dx%d input to %dx%d", width, height, new_width, new_height)
        return small, width / new_width, height / new_height

    def _run_pnet(self, image: np.ndarray) -> Boxes:
        """Propose square candidate boxes from P-Net on every pyramid scale."""
        height, width = image.shape[:2]
        scales = build_pyramid(height, width, self.min_face_size, self.scale_factor)
        all_boxes = []
        all_scores = []
        for scale in scales:
            # Truncated sizes and area resampling match the tf.image.resize call in
            # mtcnn 1.0.0. On normalized pixels cv2.INTER_AREA agrees with it to
            # about 1e-5 (measured with TensorFlow 2.21 and OpenCV 5.1).
            scaled = cv2.resize(
                image, (int(width * scale), int(height * scale)), interpolation=cv2.INTER_AREA
            )
            outputs = self.pnet.run(scaled[None])
            boxes, scores = generate_candidates(
                outputs["bbox_reg"], outputs["bbox_class"], scale, self.thresholds[0]
            )
            keep = nms(boxes, PNET_SCALE_NMS_THRESHOLD)
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])

        if not all_boxes:
            return np.empty((0, 4))
        boxes, scores = _sort_by_score(np.concatenate(all_boxes), np.concatenate(all_scores))
        keep = nms(boxes, PNET_CROSS_SCALE_NMS_THRESHOLD)
        log.debug("P-Net: %d candidates over %d scales", len(keep), len(scales))
        return square_boxes(boxes[keep])

    def _run_rnet(self, image: np.ndarray, boxes: Boxes) -> Boxes:
        """Rescore and regress P-Net's candidates with R-Net, one batch for all boxes."""
        outputs = self.rnet.run(extract_patches(image, boxes, RNET_INPUT_SIZE))
        scores = outputs["bbox_class"][:, 1].astype(np.float64)
        boxes = regress_boxes(boxes, outputs["bbox_reg"])

        passed = scores > self.thresholds[1]
        boxes, scores = _sort_by_score(boxes[passed], scores[passed])
        keep = nms(boxes, RNET_NMS_THRESHOLD)
        log.debug("R-Net: %d candidates", len(keep))
        return square_boxes(boxes[keep])

    def _run_onet(self, image: np.ndarray, boxes: Boxes) -> tuple[Boxes, np.ndarray, np.ndarray]:
        """Score, regress and find landmarks with O-Net, one batch for all boxes.

        Returns boxes, scores and (N, 5, 2) landmarks of the final faces, best first.
        """
        outputs = self.onet.run(extract_patches(image, boxes, ONET_INPUT_SIZE))
        scores = outputs["bbox_class"][:, 1].astype(np.float64)
        landmarks = landmarks_to_pixels(boxes, outputs["landmarks"].astype(np.float64))
        boxes = regress_boxes(boxes, outputs["bbox_reg"])

        passed = np.flatnonzero(scores > self.thresholds[2])
        passed = passed[order_by_score(scores[passed])]
        keep = passed[nms(boxes[passed], ONET_NMS_THRESHOLD, method="min")]
        log.debug("O-Net: %d faces", len(keep))
        return boxes[keep], scores[keep], landmarks[keep]
