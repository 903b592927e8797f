"""Convert facenet_keras.h5 to ONNX by walking its layer configs, without TensorFlow.

The model maps a batch of prewhitened 160x160 RGB faces, input `input`
[N, 160, 160, 3] float32 NHWC, to output `embedding` [N, 128]. The embedding
is the raw Bottleneck_BatchNorm output, not L2-normalised, because the agent
normalises it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from agent.models.facenet_h5 import Layer, read_facenet_h5
from agent.models.onnx_graph import GraphBuilder

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
IMAGE_SIZE = 160
EMBEDDING_SIZE = 128


def convert_facenet(h5_path: Path) -> onnx.ModelProto:
    """Return the ONNX FaceNet embedder for the weights in `h5_path`."""
    parsed = read_facenet_h5(h5_path)
    graph = GraphBuilder("facenet")
    tensors: dict[str, str] = {}

    for layer in parsed.layers:
        if layer.class_name == "InputLayer":
            _check_input_shape(layer)
            tensors[layer.name] = graph.input_nhwc(INPUT_NAME, ("N", IMAGE_SIZE, IMAGE_SIZE, 3))
            continue
        inputs = [tensors[name] for name in layer.inputs]
        tensors[layer.name] = _add_layer(graph, layer, inputs)

    embedding = tensors[parsed.output_name]
    if graph.shapes[embedding][1] != EMBEDDING_SIZE:
        raise ValueError(f"{h5_path}: output shape is {graph.shapes[embedding]}, expected 128")
    graph.output(embedding, OUTPUT_NAME)
    log.info("converted FaceNet from %s: %d ONNX nodes", h5_path, len(graph.nodes))
    return graph.build(
        "FaceNet Inception-ResNet-v1 (davidsandberg/facenet 20170512-110547) "
        "converted from facenet_keras.h5"
    )


def _add_layer(graph: GraphBuilder, layer: Layer, inputs: list[str]) -> str:
    config, weights, name = layer.config, layer.weights, layer.name
    match layer.class_name:
        case "Conv2D":
            _check(layer, config["activation"] == "linear", "activation must be linear")
            _check(layer, tuple(config["dilation_rate"]) == (1, 1), "dilation must be 1")
            return graph.conv(
                inputs[0], weights["kernel"], weights.get("bias"),
                tuple(config["strides"]), config["padding"], name=name,
            )
        case "BatchNormalization":
            # Keras axis 3 (NHWC channels) and axis -1 of the (N, 128) bottleneck are both
            # ONNX axis 1.
            _check(layer, config["axis"] in (3, -1), "axis must be the channel axis")
            return graph.batch_norm(
                inputs[0], weights["beta"], weights["moving_mean"], weights["moving_variance"],
                config["epsilon"], name=name, gamma=weights.get("gamma"),
            )
        case "Activation":
            _check(layer, config["activation"] == "relu", "activation must be relu")
            return graph.relu(inputs[0], name=name)
        case "Concatenate":
            _check(layer, config["axis"] in (3, -1), "axis must be the channel axis")
            return graph.concat(inputs, name=name)
        case "Lambda":
            _check(layer, name.endswith("_ScaleSum"), "only *_ScaleSum Lambda layers are known")
            return graph.scale_sum(inputs[0], inputs[1], config["arguments"]["scale"], name=name)
        case "MaxPooling2D":
            return graph.max_pool(
                inputs[0], tuple(config["pool_size"]), tuple(config["strides"]),
                config["padding"], name=name,
            )
        case "GlobalAveragePooling2D":
            return graph.global_average_pool(inputs[0], name=name)
        case "Dropout":
            return inputs[0]  # identity at inference
        case "Dense":
            _check(layer, config["activation"] == "linear", "activation must be linear")
            return graph.dense(inputs[0], weights["kernel"], weights.get("bias"), name=name)
    raise ValueError(f"layer {name!r} has unsupported class {layer.class_name!r}")


def _check_input_shape(layer: Layer) -> None:
    shape = tuple(layer.config["batch_input_shape"][1:])
    _check(layer, shape == (IMAGE_SIZE, IMAGE_SIZE, 3), f"input shape {shape} is not 160x160x3")


def _check(layer: Layer, condition: bool, requirement: str) -> None:
    if not condition:
        raise ValueError(f"cannot convert layer {layer.name!r} ({layer.class_name}): {requirement}")
