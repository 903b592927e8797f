"""Read facenet_keras.h5 (a Keras 2.1.2 file) without Keras: layer configs and weights.

The file stores the functional graph as JSON in the `model_config` attribute
and each layer's arrays under model_weights/<layer>/<layer>/<name>:0, listed
in the group's `weight_names` attribute. Both the Keras rebuild and the ONNX
converter walk the layers returned here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Layer classes the converters know; any other class in the file is an error.
SUPPORTED_LAYERS = frozenset({
    "InputLayer", "Conv2D", "BatchNormalization", "Activation", "Concatenate", "Lambda",
    "MaxPooling2D", "GlobalAveragePooling2D", "Dropout", "Dense",
})


@dataclass(frozen=True)
class Layer:
    """One layer of the model_config, with its weights keyed by short name ('kernel', 'beta')."""

    name: str
    class_name: str
    config: dict
    inputs: tuple[str, ...]
    weights: dict[str, np.ndarray]


@dataclass(frozen=True)
class FacenetH5:
    """The parsed file: layers in graph order, and the names of the input and output layers."""

    layers: tuple[Layer, ...]
    input_name: str
    output_name: str
    keras_version: str


def read_facenet_h5(path: Path) -> FacenetH5:
    """Parse the model_config JSON and read every layer's weights into NumPy arrays."""
    import h5py

    with h5py.File(path, "r") as file:
        config = json.loads(_text(file.attrs["model_config"]))["config"]
        weights_group = file["model_weights"]
        keras_version = _text(file.attrs.get("keras_version", "unknown"))

        layers = []
        for layer_config in config["layers"]:
            name = layer_config["name"]
            class_name = layer_config["class_name"]
            if class_name not in SUPPORTED_LAYERS:
                raise ValueError(f"{path}: layer {name!r} has unsupported class {class_name!r}")
            weights = _layer_weights(weights_group, name) if name in weights_group else {}
            layers.append(Layer(
                name=name,
                class_name=class_name,
                config=layer_config["config"],
                inputs=_inbound_layer_names(layer_config),
                weights=weights,
            ))

    (input_name, _, _), = config["input_layers"]
    (output_name, _, _), = config["output_layers"]
    return FacenetH5(tuple(layers), input_name, output_name, keras_version)


def _inbound_layer_names(layer_config: dict) -> tuple[str, ...]:
    nodes = layer_config["inbound_nodes"]
    if not nodes:
        return ()
    if len(nodes) > 1:
        raise ValueError(f"layer {layer_config['name']!r} is called more than once")
    return tuple(inbound[0] for inbound in nodes[0])


def _layer_weights(weights_group, layer_name: str) -> dict[str, np.ndarray]:
    group = weights_group[layer_name]
    weights = {}
    for full_name in group.attrs.get("weight_names", []):
        full_name = _text(full_name)  # e.g. "Conv2d_1a_3x3/kernel:0"
        short_name = full_name.rsplit("/", 1)[-1].split(":", 1)[0]
        weights[short_name] = np.asarray(group[full_name], dtype=np.float32)
    return weights


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
