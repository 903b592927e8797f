"""ONNX Runtime backend: CPU by default, with CUDA or TensorRT providers when requested."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.runtimes.base import ModelSession, Runtime, RuntimeNotInstalledError

log = logging.getLogger(__name__)


class OrtSession(ModelSession):
    def __init__(self, session: Any, path: Path) -> None:
        self._session = session
        self.runtime = "onnxruntime"
        self.provider = session.get_providers()[0]
        self.input_name = session.get_inputs()[0].name
        self.output_names = tuple(output.name for output in session.get_outputs())
        self.path = path

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        outputs = self._session.run(list(self.output_names), feed)
        return {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(self.output_names, outputs, strict=True)
        }


class OnnxRuntime(Runtime):
    name: ClassVar[str] = "onnxruntime"
    package: ClassVar[str] = "onnxruntime"

    def __init__(self, threads: int = 0, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        # threads=0 lets ONNX Runtime use one thread per physical core.
        self.threads = threads
        self.providers = providers

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def load(self, path: Path) -> ModelSession:
        if not self.is_installed():
            raise RuntimeNotInstalledError(
                "runtime 'onnxruntime' is not installed: run 'pip install onnxruntime'"
            )
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(onnxruntime.get_available_providers())
        providers = [p for p in self.providers if p in available]
        missing = [p for p in self.providers if p not in available]
        if missing:
            log.warning(
                "ONNX Runtime providers %s are not available here (available: %s); using %s",
                missing, sorted(available), providers or ["CPUExecutionProvider"],
            )
        session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        log.info("loaded %s on onnxruntime %s with provider %s",
                 path.name, onnxruntime.__version__, session.get_providers()[0])
        return OrtSession(session, path)
