"""The runtime interface: one loaded model on one inference library.

Each backend (ONNX Runtime now; TFLite and TensorFlow later) lives in its own
module next to this one and returns the same thing: float32 NumPy arrays keyed
by the output names that the model manifest lists. Code above this layer never
branches on the runtime.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

import numpy as np


class RuntimeNotInstalledError(RuntimeError):
    """A runtime was requested whose Python package is not installed."""


class ModelSession(abc.ABC):
    """A model loaded on one runtime, ready to run batches."""

    runtime: str
    provider: str
    input_name: str
    output_names: tuple[str, ...]

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one float32 batch and return every output as float32, keyed by name."""


class Runtime(abc.ABC):
    """Factory for model sessions on one inference library."""

    name: ClassVar[str]
    package: ClassVar[str]  # pip package to install when this runtime is missing

    @classmethod
    @abc.abstractmethod
    def is_installed(cls) -> bool:
        """Return True when the runtime's package imports on this machine."""

    @abc.abstractmethod
    def load(self, path: Path) -> ModelSession:
        """Load the model file at `path`."""
