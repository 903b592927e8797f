"""Convert the MTCNN weights of the `mtcnn` 1.0.0 wheel to three ONNX models.

The wheel stores each stage as a joblib list of NumPy arrays in the order of
`model.get_weights()` of its Keras networks (mtcnn/network/{pnet,rnet,onet}.py).
The functions below rebuild those networks layer by layer, so the ONNX models
return what the Keras models return, with the same names and layouts:

- P-Net: input [N, H, W, 3], outputs `bbox_reg` [N, H', W', 4] and `bbox_class`
  [N, H', W', 2], with H' = ceil((H - 2) / 2) - 4 (one cell per 2-pixel stride of
  a 12x12 window).
- R-Net: input [N, 24, 24, 3], outputs `bbox_reg` [N, 4] and `bbox_class` [N, 2].
- O-Net: input [N, 48, 48, 3], outputs `bbox_reg` [N, 4], `landmarks` [N, 10] and
  `bbox_class` [N, 2].

Inputs are RGB images in row-major (height, width) order, not transposed,
scaled as (pixel - 127.5) / 128 (mtcnn 1.0.0 utils/images.normalize_images).
`bbox_reg` contains (x1, y1, x2, y2) offsets as fractions of the box size.
`landmarks` contains x1..x5 then y1..y5 as fractions of the box, for left eye,
right eye, nose, left mouth corner and right mouth corner. `bbox_class` is the
softmax over (not face, face).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from agent.models.onnx_graph import GraphBuilder

log = logging.getLogger(__name__)

INPUT_NAME = "input"
INPUT_SHAPES: dict[str, tuple[int | None, ...]] = {
    "pnet": (None, None, None, 3),
    "rnet": (None, 24, 24, 3),
    "onet": (None, 48, 48, 3),
}
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "pnet": ("bbox_reg", "bbox_class"),
    "rnet": ("bbox_reg", "bbox_class"),
    "onet": ("bbox_reg", "landmarks", "bbox_class"),
}
# Mean and scale that mtcnn 1.0.0 applies to RGB pixels before every stage.
NORMALIZATION = {"mean": 127.5, "scale": 1 / 128}


def load_stage_weights(weights_dir: Path, stage: str) -> list[np.ndarray]:
    """Load `<stage>.lz4` from the wheel's mtcnn/assets/weights directory."""
    import joblib

    path = weights_dir / f"{stage}.lz4"
    if not path.is_file():
        raise FileNotFoundError(f"MTCNN weights file not found: {path}")
    # joblib files are pickles, so only load the ones from the pinned wheel.
    weights = joblib.load(path)
    return [np.asarray(w, dtype=np.float32) for w in weights]


def _conv_block(
    graph: GraphBuilder, x: str, weights: Iterator[np.ndarray], index: int
) -> str:
    """Conv2D ('valid', stride 1, with bias) followed by PReLU shared over H and W."""
    x = graph.conv(x, next(weights), next(weights), (1, 1), "valid", name=f"conv{index}")
    return graph.prelu(x, next(weights), name=f"prelu{index}")


def _dense_head(graph: GraphBuilder, x: str, weights: Iterator[np.ndarray], name: str) -> str:
    return graph.dense(x, next(weights), next(weights), name=name)


def _permute_flatten(graph: GraphBuilder, x: str, name: str) -> str:
    # Keras Permute((2, 1, 3)) turns NHWC into (N, W, H, C) before Flatten; that is
    # NCHW transposed with perm (0, 3, 2, 1). The Dense weights expect this order.
    x = graph.transpose(x, (0, 3, 2, 1), name="permute")
    return graph.flatten(x, name=name)


def build_pnet(weights: list[np.ndarray]) -> onnx.ModelProto:
    """Build P-Net for any image height and width of at least 12 pixels."""
    graph = GraphBuilder("mtcnn_pnet")
    w = iter(weights)
    x = graph.input_nhwc(INPUT_NAME, ("N", "H", "W", 3))

    x = _conv_block(graph, x, w, 1)
    x = graph.max_pool(x, (2, 2), (2, 2), "same", name="maxpooling1")
    x = _conv_block(graph, x, w, 2)
    x = _conv_block(graph, x, w, 3)

    bbox_reg = graph.conv(x, next(w), next(w), (1, 1), "valid", name="conv4-1")
    logits = graph.conv(x, next(w), next(w), (1, 1), "valid", name="conv4-2")
    bbox_class = graph.softmax(logits, axis=1, name="conv4-2/softmax")
    _expect_exhausted(w, "pnet")

    # The Keras network returns NHWC maps, so transpose back.
    graph.output(graph.transpose(bbox_reg, (0, 2, 3, 1), name="bbox_reg_nhwc"), "bbox_reg")
    graph.output(graph.transpose(bbox_class, (0, 2, 3, 1), name="bbox_class_nhwc"), "bbox_class")
    return graph.build("MTCNN P-Net converted from the mtcnn 1.0.0 wheel")


def build_rnet(weights: list[np.ndarray]) -> onnx.ModelProto:
    """Build R-Net for 24x24 crops."""
    graph = GraphBuilder("mtcnn_rnet")
    w = iter(weights)
    x = graph.input_nhwc(INPUT_NAME, ("N", 24, 24, 3))

    x = _conv_block(graph, x, w, 1)
    x = graph.max_pool(x, (3, 3), (2, 2), "same", name="maxpooling1")
    x = _conv_block(graph, x, w, 2)
    x = graph.max_pool(x, (3, 3), (2, 2), "valid", name="maxpooling2")
    x = _conv_block(graph, x, w, 3)

    x = _permute_flatten(graph, x, name="flatten3")
    x = _dense_head(graph, x, w, "fc4")
    x = graph.prelu(x, next(w), name="prelu4")

    bbox_reg = _dense_head(graph, x, w, "fc5-1")
    bbox_class = graph.softmax(_dense_head(graph, x, w, "fc5-2"), axis=1, name="fc5-2/softmax")
    _expect_exhausted(w, "rnet")

    graph.output(bbox_reg, "bbox_reg")
    graph.output(bbox_class, "bbox_class")
    return graph.build("MTCNN R-Net converted from the mtcnn 1.0.0 wheel")


def build_onet(weights: list[np.ndarray]) -> onnx.ModelProto:
    """Build O-Net for 48x48 crops."""
    graph = GraphBuilder("mtcnn_onet")
    w = iter(weights)
    x = graph.input_nhwc(INPUT_NAME, ("N", 48, 48, 3))

    x = _conv_block(graph, x, w, 1)
    x = graph.max_pool(x, (3, 3), (2, 2), "same", name="maxpooling1")
    x = _conv_block(graph, x, w, 2)
    x = graph.max_pool(x, (3, 3), (2, 2), "valid", name="maxpooling2")
    x = _conv_block(graph, x, w, 3)
    x = graph.max_pool(x, (2, 2), (2, 2), "same", name="maxpooling3")
    x = _conv_block(graph, x, w, 4)

    x = _permute_flatten(graph, x, name="flatten4")
    x = _dense_head(graph, x, w, "fc5")
    x = graph.prelu(x, next(w), name="prelu5")

    bbox_reg = _dense_head(graph, x, w, "fc6-1")
    landmarks = _dense_head(graph, x, w, "fc6-2")
    bbox_class = graph.softmax(_dense_head(graph, x, w, "fc6-3"), axis=1, name="fc6-3/softmax")
    _expect_exhausted(w, "onet")

    graph.output(bbox_reg, "bbox_reg")
    graph.output(landmarks, "landmarks")
    graph.output(bbox_class, "bbox_class")
    return graph.build("MTCNN O-Net converted from the mtcnn 1.0.0 wheel")


BUILDERS = {"pnet": build_pnet, "rnet": build_rnet, "onet": build_onet}


def convert_mtcnn(weights_dir: Path) -> dict[str, onnx.ModelProto]:
    """Convert all three stages; keys are 'pnet', 'rnet' and 'onet'."""
    models = {}
    for stage, build in BUILDERS.items():
        log.info("converting MTCNN %s from %s", stage, weights_dir / f"{stage}.lz4")
        models[stage] = build(load_stage_weights(weights_dir, stage))
    return models


def _expect_exhausted(weights: Iterator[np.ndarray], stage: str) -> None:
    leftover = sum(1 for _ in weights)
    if leftover:
        raise ValueError(
            f"MTCNN {stage} weights contain {leftover} more arrays than the network uses: "
            "the weights file does not come from mtcnn 1.0.0"
        )
