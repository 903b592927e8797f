"""TensorFlow backend: runs the SavedModel's serving_default signature.

TensorFlow places the graph on a GPU when it sees one (CUDA builds only) and
on the CPU otherwise. Its thread pools are process-wide and can only be sized
before the first operation runs, so the first session to load sets them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent.runtimes.base import ModelSession, Runtime, distribution_version

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"


class TensorflowSession(ModelSession):
    def __init__(self, tf: Any, loaded: Any, path: Path, provider: str) -> None:
        self._tf = tf
        self._loaded = loaded  # keeps the variables alive as long as the signature
        self._function = loaded.signatures[SIGNATURE]
        self.runtime = "tensorflow"
        self.provider = provider
        _, inputs = self._function.structured_input_signature
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one input, found {sorted(inputs)}")
        (self.input_name,) = inputs
        self.output_names = tuple(self._function.structured_outputs)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        tensor = self._tf.constant(np.ascontiguousarray(batch, dtype=np.float32))
        outputs = self._function(**{self.input_name: tensor})
        return {name: outputs[name].numpy().astype(np.float32, copy=False)
                for name in self.output_names}


class TensorflowRuntime(Runtime):
    name: ClassVar[str] = "tensorflow"
    package: ClassVar[str] = "tensorflow-cpu"
    model_format: ClassVar[str] = "savedmodel"

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("tensorflow") is not None

    @classmethod
    def version(cls) -> str:
        if not cls.is_installed():
            raise cls.not_installed()
        return distribution_version("tensorflow")

    def load(self, path: Path, *, precision: str = "fp32", batch_size: int | None = None,
             sha256: str = "") -> ModelSession:
        if not self.is_installed():
            raise self.not_installed()
        import tensorflow as tf

        self._set_threads(tf)
        loaded = tf.saved_model.load(str(path))
        gpus = tf.config.list_logical_devices("GPU")
        provider = gpus[0].name if gpus else "CPU"
        log.info("loaded %s (%s) on tensorflow %s on %s", path.name, precision,
                 tf.__version__, provider)
        return TensorflowSession(tf, loaded, path, provider)

    def _set_threads(self, tf: Any) -> None:
        threads = self.options.threads
        if threads <= 0 or tf.config.threading.get_intra_op_parallelism_threads() == threads:
            return
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError as error:
            # TensorFlow refuses once its runtime has started; the first setting stays.
            log.warning("cannot set TensorFlow to %d threads: %s", threads, error)
