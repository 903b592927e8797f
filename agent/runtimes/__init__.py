"""Inference backends behind one interface (see base.py); one module per runtime.

The registry below names each backend's module without importing it, so that
an install with only one inference package never imports the others.
"""

from __future__ import annotations

import importlib
import logging

from agent.runtimes.base import (
    PRECISIONS,
    ModelSession,
    Runtime,
    RuntimeNotInstalledError,
    RuntimeOptions,
)
from agent.runtimes.ort import OnnxRuntime

log = logging.getLogger(__name__)

# Runtime name -> "module:class". Importing a backend module is cheap: each one
# imports its inference package only inside load() and version().
REGISTRY = {
    "onnxruntime": "agent.runtimes.ort:OnnxRuntime",
    "tflite": "agent.runtimes.tflite:TfliteRuntime",
    "tensorflow": "agent.runtimes.tf:TensorflowRuntime",
}


def runtime_class(name: str) -> type[Runtime]:
    """Return the backend class registered as `name`; raise ValueError for an unknown name."""
    try:
        module_name, class_name = REGISTRY[name].split(":")
    except KeyError:
        raise ValueError(
            f"unknown runtime {name!r}: expected one of {', '.join(REGISTRY)}"
        ) from None
    cls: type[Runtime] = getattr(importlib.import_module(module_name), class_name)
    return cls


def create_runtime(name: str, options: RuntimeOptions | None = None) -> Runtime:
    """Return backend `name`; raise RuntimeNotInstalledError naming its pip package if absent."""
    cls = runtime_class(name)
    if not cls.is_installed():
        raise cls.not_installed()
    return cls(options)


def installed_runtimes() -> list[str]:
    """Return the names of the registered runtimes whose package is installed, in registry order."""
    return [name for name in REGISTRY if runtime_class(name).is_installed()]


def runtimes_for_format(model_format: str) -> list[str]:
    """Return the installed runtimes that load `model_format` files, in registry order."""
    return [name for name in installed_runtimes()
            if runtime_class(name).model_format == model_format]


__all__ = [
    "PRECISIONS",
    "REGISTRY",
    "ModelSession",
    "OnnxRuntime",
    "Runtime",
    "RuntimeNotInstalledError",
    "RuntimeOptions",
    "create_runtime",
    "installed_runtimes",
    "runtime_class",
    "runtimes_for_format",
]
