"""The runtime interface: one loaded model on one inference library.

Each backend (ONNX Runtime, TFLite, TensorFlow) lives in its own module next to
this one and returns the same thing: float32 NumPy arrays keyed by the output
names that the model manifest lists. Each runtime loads one model format
(`Runtime.model_format`), and the manifest lists a file per format and
precision, so code above this layer picks a file by asking the runtime for its
format and never branches on the runtime's name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")


def distribution_version(import_name: str) -> str:
    """Return the installed version of the distribution that provides `import_name`.

    Reads package metadata without importing the package, which for TensorFlow
    saves seconds and hundreds of MB. Returns "unknown" if no metadata names it.
    """
    from importlib import metadata

    for distribution in metadata.packages_distributions().get(import_name, []):
        try:
            return f"{distribution} {metadata.version(distribution)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


class RuntimeNotInstalledError(RuntimeError):
    """A runtime was requested whose Python package is not installed."""


@dataclass(frozen=True)
class RuntimeOptions:
    """Settings shared by every runtime; each backend reads the ones that apply to it."""

    threads: int = 0  # intra-op threads; 0 lets the library pick one per core
    # ONNX Runtime execution providers or TFLite delegates, in order of preference.
    # An empty tuple means the runtime's CPU default.
    accelerators: tuple[str, ...] = ()
    # Folder for compiled artefacts that outlive the process (TensorRT engines).
    cache_dir: Path | None = None


class ModelSession(abc.ABC):
    """A model loaded on one runtime, ready to run batches."""

    runtime: str
    provider: str  # the execution provider or delegate that runs most of the graph
    precision: str = "fp32"  # the variant loaded; build_pipeline sets it from its selection
    input_name: str
    output_names: tuple[str, ...]

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one float32 batch and return every output as float32, keyed by name."""


class Runtime(abc.ABC):
    """Factory for model sessions on one inference library."""

    name: ClassVar[str]
    package: ClassVar[str]  # pip package to install when this runtime is missing
    model_format: ClassVar[str]  # "onnx", "tflite" or "savedmodel": the files it loads

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        self.options = options or RuntimeOptions()

    @classmethod
    @abc.abstractmethod
    def is_installed(cls) -> bool:
        """Return True when the runtime's package imports on this machine."""

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str:
        """Return the version of the installed package; raise RuntimeNotInstalledError if none."""

    @abc.abstractmethod
    def load(self, path: Path, *, precision: str = "fp32", batch_size: int | None = None,
             sha256: str = "") -> ModelSession:
        """Load the model file (or SavedModel folder) at `path`.

        `precision` names the variant that `path` holds, `batch_size` the batch
        the caller expects to run most, and `sha256` the file's checksum from
        the manifest; runtimes that cache compiled engines key them by all three.
        """

    @classmethod
    def not_installed(cls) -> RuntimeNotInstalledError:
        return RuntimeNotInstalledError(
            f"runtime {cls.name!r} is not installed: run 'pip install {cls.package}'"
        )
