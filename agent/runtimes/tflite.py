"""TFLite backend: the LiteRT interpreter with XNNPACK on the CPU, and a GPU delegate when present.

The interpreter comes from the first of these packages that imports:
`ai_edge_litert` (LiteRT, the current name), `tflite_runtime` (the older
stand-alone wheel, last released as 2.14) and `tensorflow.lite`. XNNPACK is
the CPU default in all three and takes the configured thread count.

A TFLite interpreter is allocated for one input shape, and changing the shape
re-plans memory and re-applies the delegates. Sessions therefore keep one
interpreter per input shape (least recently used first out) and round the
batch dimension up to a power of two, so an embedder that runs batches of 1
to 32 faces needs at most six interpreters.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.runtimes.base import ModelSession, Runtime, RuntimeOptions, distribution_version

log = logging.getLogger(__name__)

# Package to import, and the module in it that has Interpreter and load_delegate.
INTERPRETER_MODULES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite.python.interpreter"),
)
# Shared library of the TFLite GPU delegate (OpenCL or OpenGL ES); boards that
# have one ship it in their TFLite build or vendor image.
GPU_DELEGATE_LIBRARY = "libtensorflowlite_gpu_delegate.so"
XNNPACK = "xnnpack"
GPU = "gpu"
MAX_CACHED_SHAPES = 8


def _find_interpreter_module() -> str | None:
    for package, module in INTERPRETER_MODULES:
        if importlib.util.find_spec(package) is not None:
            return module
    return None


class TfliteSession(ModelSession):
    def __init__(self, module: Any, path: Path, threads: int | None,
                 delegates: list[Any], provider: str) -> None:
        self._module = module
        self._path = path
        self._threads = threads
        self._delegates = delegates
        self._interpreters: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.runtime = "tflite"
        self.provider = provider

        # The signature gives the ONNX names; its tensor indices then drive the
        # interpreter directly, because SignatureRunner re-allocates on every call.
        interpreter = self._new_interpreter()
        runner = interpreter.get_signature_runner()
        inputs = runner.get_input_details()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one input, found {sorted(inputs)}")
        (self.input_name,) = inputs
        self._input_index = inputs[self.input_name]["index"]
        outputs = runner.get_output_details()
        self.output_names = tuple(outputs)
        self._output_indices = {name: detail["index"] for name, detail in outputs.items()}
        signature = inputs[self.input_name]["shape_signature"]
        self._dynamic_batch = int(signature[0]) == -1
        # Allocation waits for the first batch: the default shape of P-Net's
        # dynamic input is 1x1x1x3, which its 3x3 convolutions cannot take.

    def _new_interpreter(self) -> Any:
        return self._module.Interpreter(
            model_path=str(self._path), num_threads=self._threads,
            experimental_delegates=self._delegates or None,
        )

    def _interpreter(self, shape: tuple[int, ...]) -> Any:
        interpreter = self._interpreters.get(shape)
        if interpreter is not None:
            self._interpreters.move_to_end(shape)
            return interpreter
        interpreter = self._new_interpreter()
        interpreter.resize_tensor_input(self._input_index, list(shape), strict=False)
        interpreter.allocate_tensors()
        self._interpreters[shape] = interpreter
        if len(self._interpreters) > MAX_CACHED_SHAPES:
            self._interpreters.popitem(last=False)
        log.debug("allocated %s for input shape %s", self._path.name, shape)
        return interpreter

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        count = len(batch)
        if self._dynamic_batch and count > 0:
            padded = 1 << (count - 1).bit_length()  # next power of two
            if padded != count:
                filler = np.zeros((padded - count, *batch.shape[1:]), dtype=np.float32)
                batch = np.concatenate([batch, filler])
        interpreter = self._interpreter(batch.shape)
        interpreter.set_tensor(self._input_index, batch)
        interpreter.invoke()
        return {
            name: np.array(interpreter.get_tensor(index)[:count], dtype=np.float32)
            for name, index in self._output_indices.items()
        }


class TfliteRuntime(Runtime):
    name: ClassVar[str] = "tflite"
    package: ClassVar[str] = "ai-edge-litert"
    model_format: ClassVar[str] = "tflite"

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        super().__init__(options)
        self.delegates = self.options.accelerators or (XNNPACK,)

    @classmethod
    def is_installed(cls) -> bool:
        return _find_interpreter_module() is not None

    @classmethod
    def interpreter_package(cls) -> str:
        """Return the package that provides the interpreter, such as 'ai_edge_litert'."""
        module = _find_interpreter_module()
        if module is None:
            raise cls.not_installed()
        return module.split(".", 1)[0]

    @classmethod
    def version(cls) -> str:
        return distribution_version(cls.interpreter_package())

    def load(self, path: Path, *, precision: str = "fp32", batch_size: int | None = None,
             sha256: str = "") -> ModelSession:
        module_name = _find_interpreter_module()
        if module_name is None:
            raise self.not_installed()
        module = importlib.import_module(module_name)
        threads = self.options.threads or None  # None lets TFLite choose
        delegates, provider = self._load_delegates(module)
        session = TfliteSession(module, path, threads, delegates, provider)
        log.info("loaded %s (%s) on %s with %s, %s threads", path.name, precision,
                 self.version(), provider, threads or "default")
        return session

    def _load_delegates(self, module: Any) -> tuple[list[Any], str]:
        for delegate in self.delegates:
            if delegate == XNNPACK:
                # XNNPACK is built into the interpreter and applied by default.
                return [], XNNPACK
            if delegate == GPU:
                try:
                    return [module.load_delegate(GPU_DELEGATE_LIBRARY)], GPU
                except (OSError, ValueError, RuntimeError) as error:
                    log.warning("TFLite GPU delegate %s is not available (%s); trying the "
                                "next delegate", GPU_DELEGATE_LIBRARY, error)
                    continue
            raise ValueError(f"unknown TFLite delegate {delegate!r}: expected {XNNPACK!r} "
                             f"or {GPU!r}")
        return [], XNNPACK
