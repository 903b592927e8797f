"""ONNX Runtime backend: CPU by default, CUDA and TensorRT execution providers when present.

TensorRT compiles an engine per input shape and precision, which takes minutes
on a Jetson, so the engines go to a cache folder keyed by the model's sha256,
the batch size and the precision. A second start with the same key loads the
engine from disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.runtimes.base import ModelSession, Runtime, RuntimeOptions, distribution_version

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


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
    model_format: ClassVar[str] = "onnx"

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        super().__init__(options)
        self.providers = self.options.accelerators or (CPU,)

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def version(cls) -> str:
        if not cls.is_installed():
            raise cls.not_installed()
        return distribution_version("onnxruntime")

    def load(self, path: Path, *, precision: str = "fp32", batch_size: int | None = None,
             sha256: str = "") -> ModelSession:
        if not self.is_installed():
            raise self.not_installed()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.options.threads
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(onnxruntime.get_available_providers())
        providers = [p for p in self.providers if p in available]
        missing = [p for p in self.providers if p not in available]
        if missing:
            log.warning(
                "ONNX Runtime providers %s are not available here (available: %s); using %s",
                missing, sorted(available), providers or [CPU],
            )
        if CPU not in providers:
            providers.append(CPU)  # runs the nodes that the accelerators reject
        provider_options = [
            self._provider_options(p, path, precision, batch_size, sha256) for p in providers
        ]
        session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers,
            provider_options=provider_options,
        )
        log.info("loaded %s (%s) on onnxruntime %s with provider %s",
                 path.name, precision, onnxruntime.__version__, session.get_providers()[0])
        return OrtSession(session, path)

    def _provider_options(self, provider: str, path: Path, precision: str,
                          batch_size: int | None, sha256: str) -> dict[str, Any]:
        if provider != TENSORRT:
            return {}
        engine_dir = self.engine_cache_dir(path, precision, batch_size, sha256)
        engine_dir.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(engine_dir),
            # fp16 is a build flag on the fp32 file. The int8 file carries its own
            # Q/DQ scales, so TensorRT needs no calibration table for it.
            "trt_fp16_enable": precision in ("fp16", "int8"),
            "trt_int8_enable": precision == "int8",
        }
        # NOTE: no optimisation profile is set, so TensorRT builds an engine for each
        # input shape it meets. That suits the embedder at a fixed batch size, but
        # P-Net sees one shape per pyramid scale and R-Net and O-Net a varying batch.
        # Untested on a Jetson: this machine has no CUDA.
        log.info("TensorRT engines for %s (%s, batch %s) are cached in %s",
                 path.name, precision, batch_size or "any", engine_dir)
        return options

    def engine_cache_dir(self, path: Path, precision: str, batch_size: int | None,
                         sha256: str) -> Path:
        """Return the TensorRT engine folder for one model, precision and batch size."""
        root = self.options.cache_dir or path.parent / ".trt-cache"
        model_key = (sha256 or _file_key(path))[:16]
        batch = f"b{batch_size}" if batch_size else "bdyn"
        return root / "tensorrt" / f"{path.stem}-{model_key}-{precision}-{batch}"


def _file_key(path: Path) -> str:
    # Without a manifest checksum, the name, size and modification time stand in for it.
    stat = path.stat()
    text = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()
