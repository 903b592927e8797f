"""Write ONNX graphs by hand from NumPy weights, one Keras-style layer per call.

Both converters (FaceNet and the three MTCNN stages) use this builder, so no
TensorFlow is needed to produce the .onnx files. Graph inputs are NHWC, as in
Keras; the builder transposes once to NCHW, which is what ONNX Conv and
MaxPool expect, and every method below takes and returns NCHW tensor names.
Weights are given in Keras layout (Conv2D kernel HWIO, Dense kernel in x out)
and transposed here.

The builder also tracks tensor shapes. Spatial sizes that are known when the
graph is built get explicit 'same' pads, and dynamic ones fall back to
auto_pad=SAME_UPPER. Both put the odd padding pixel at the end, as TensorFlow
does.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset 13 is the first with single-axis Softmax. IR version 8 (ONNX 1.10)
# lets ONNX Runtime 1.10 and later load the files, whereas make_model would
# stamp the newest IR version of the installed onnx package.
OPSET = 13
IR_VERSION = 8

# A dimension is an int when fixed, a str for a named dynamic dimension of a
# graph input (e.g. "N"), or None for a dynamic dimension computed inside.
Dim = int | str | None


class GraphBuilder:
    """Collect nodes, initializers and shapes for one ONNX graph."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, tuple[Dim, ...]] = {}

    # Graph inputs and outputs

    def input_nhwc(self, name: str, shape: tuple[Dim, ...]) -> str:
        """Declare a float32 NHWC graph input and return its NCHW transpose."""
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.shapes[name] = tuple(shape)
        return self.transpose(name, (0, 3, 1, 2), name=f"{name}_nchw")

    def output(self, tensor: str, name: str) -> None:
        """Expose `tensor` as graph output `name` with its tracked shape."""
        self._node("Identity", [tensor], name, shape=self.shapes[tensor])
        dims = [d if isinstance(d, int | str) else None for d in self.shapes[name]]
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))

    def build(self, doc_string: str = "") -> onnx.ModelProto:
        """Return the checked model."""
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, self.initializers
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="facenet-edge-agent",
            doc_string=doc_string,
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model

    # Layers

    def conv(
        self,
        x: str,
        kernel: np.ndarray,
        bias: np.ndarray | None,
        strides: tuple[int, int],
        padding: str,
        name: str,
    ) -> str:
        """Add a Keras Conv2D; `kernel` is HWIO and `padding` is 'valid' or 'same'."""
        kernel_h, kernel_w, _, filters = kernel.shape
        inputs = [x, self._constant(kernel.transpose(3, 2, 0, 1), f"{name}/kernel")]
        if bias is not None:
            inputs.append(self._constant(bias, f"{name}/bias"))
        attributes, out_hw = self._window(x, (kernel_h, kernel_w), strides, padding)
        batch = self.shapes[x][0]
        return self._node(
            "Conv", inputs, name,
            shape=(batch, filters, *out_hw),
            kernel_shape=[kernel_h, kernel_w], strides=list(strides), **attributes,
        )

    def max_pool(
        self, x: str, pool: tuple[int, int], strides: tuple[int, int], padding: str, name: str
    ) -> str:
        """Add a Keras MaxPooling2D; padded cells never win, as in TensorFlow."""
        attributes, out_hw = self._window(x, pool, strides, padding)
        batch, channels = self.shapes[x][:2]
        return self._node(
            "MaxPool", [x], name,
            shape=(batch, channels, *out_hw),
            kernel_shape=list(pool), strides=list(strides), **attributes,
        )

    def batch_norm(
        self,
        x: str,
        beta: np.ndarray,
        mean: np.ndarray,
        variance: np.ndarray,
        epsilon: float,
        name: str,
        gamma: np.ndarray | None = None,
    ) -> str:
        """Add inference-mode batch normalization over axis 1; gamma defaults to ones."""
        if gamma is None:
            gamma = np.ones_like(beta)
        inputs = [
            x,
            self._constant(gamma, f"{name}/gamma"),
            self._constant(beta, f"{name}/beta"),
            self._constant(mean, f"{name}/moving_mean"),
            self._constant(variance, f"{name}/moving_variance"),
        ]
        return self._node(
            "BatchNormalization", inputs, name, shape=self.shapes[x], epsilon=float(epsilon)
        )

    def relu(self, x: str, name: str) -> str:
        return self._node("Relu", [x], name, shape=self.shapes[x])

    def prelu(self, x: str, alpha: np.ndarray, name: str) -> str:
        """Add a Keras PReLU. `alpha` is (1, 1, C) for shared_axes=[1, 2] or (C,) after Dense."""
        if alpha.ndim == 3:
            # Keras keeps the slope as (1, 1, C) in NHWC; broadcast it as (C, 1, 1) on NCHW.
            alpha = alpha.reshape(-1, 1, 1)
        slope = self._constant(alpha, f"{name}/alpha")
        return self._node("PRelu", [x, slope], name, shape=self.shapes[x])

    def concat(self, tensors: list[str], name: str) -> str:
        """Concatenate along channels (Keras axis 3 is NCHW axis 1)."""
        first = self.shapes[tensors[0]]
        channels = [self.shapes[t][1] for t in tensors]
        known = [c for c in channels if isinstance(c, int)]
        total = sum(known) if len(known) == len(channels) else None
        return self._node("Concat", tensors, name, shape=(first[0], total, *first[2:]), axis=1)

    def scale_sum(self, x: str, residual: str, scale: float, name: str) -> str:
        """Return x + residual * scale, the residual step of Inception-ResNet blocks."""
        factor = self._constant(np.array(scale, dtype=np.float32), f"{name}/scale")
        scaled = self._node("Mul", [residual, factor], f"{name}/mul", shape=self.shapes[residual])
        return self._node("Add", [x, scaled], name, shape=self.shapes[x])

    def global_average_pool(self, x: str, name: str) -> str:
        """Average over H and W and return (N, C)."""
        batch, channels = self.shapes[x][:2]
        pooled = self._node(
            "GlobalAveragePool", [x], f"{name}/pool", shape=(batch, channels, 1, 1)
        )
        return self._node("Flatten", [pooled], name, shape=(batch, channels), axis=1)

    def flatten(self, x: str, name: str) -> str:
        """Flatten every axis after the batch axis, in the tensor's current layout."""
        batch, *rest = self.shapes[x]
        known = [d for d in rest if isinstance(d, int)]
        size = math.prod(known) if len(known) == len(rest) else None
        return self._node("Flatten", [x], name, shape=(batch, size), axis=1)

    def dense(self, x: str, kernel: np.ndarray, bias: np.ndarray | None, name: str) -> str:
        """Add a Keras Dense; `kernel` is (in, out)."""
        inputs = [x, self._constant(kernel, f"{name}/kernel")]
        if bias is not None:
            inputs.append(self._constant(bias, f"{name}/bias"))
        return self._node("Gemm", inputs, name, shape=(self.shapes[x][0], kernel.shape[1]))

    def softmax(self, x: str, axis: int, name: str) -> str:
        return self._node("Softmax", [x], name, shape=self.shapes[x], axis=axis)

    def transpose(self, x: str, perm: tuple[int, ...], name: str) -> str:
        shape = tuple(self.shapes[x][i] for i in perm)
        return self._node("Transpose", [x], name, shape=shape, perm=list(perm))

    # Internals

    def _window(
        self, x: str, kernel: tuple[int, int], strides: tuple[int, int], padding: str
    ) -> tuple[dict[str, object], tuple[Dim, Dim]]:
        """Return pad attributes and the output (H, W) of a sliding-window layer."""
        in_hw = [size for size in self.shapes[x][2:] if isinstance(size, int)]
        if padding not in ("valid", "same"):
            raise ValueError(f"unsupported padding {padding!r}: expected 'valid' or 'same'")
        if len(in_hw) != 2:
            # Dynamic H or W (P-Net): the output size is unknown until run time.
            return ({"pads": [0, 0, 0, 0]} if padding == "valid"
                    else {"auto_pad": "SAME_UPPER"}), (None, None)

        if padding == "valid":
            height, width = (
                (size - k) // s + 1 for size, k, s in zip(in_hw, kernel, strides, strict=True)
            )
            return {"pads": [0, 0, 0, 0]}, (height, width)

        height, width = (math.ceil(size / s) for size, s in zip(in_hw, strides, strict=True))
        totals = [
            max((out - 1) * s + k - size, 0)
            for out, s, k, size in zip((height, width), strides, kernel, in_hw, strict=True)
        ]
        # TensorFlow 'SAME': the smaller half goes before, the odd pixel after.
        begins = [total // 2 for total in totals]
        ends = [total - begin for total, begin in zip(totals, begins, strict=True)]
        out_hw = (height, width)
        return {"pads": begins + ends}, out_hw

    def _constant(self, array: np.ndarray, name: str) -> str:
        tensor = numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)
        self.initializers.append(tensor)
        return name

    def _node(
        self, op_type: str, inputs: list[str], name: str, shape: tuple[Dim, ...], **attributes
    ) -> str:
        if name in self.shapes:
            raise ValueError(f"tensor name {name!r} is already used in graph {self.name!r}")
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attributes))
        self.shapes[name] = shape
        return name
