"""Inference backends behind one interface (see base.py); one module per runtime."""

from agent.runtimes.base import ModelSession, Runtime, RuntimeNotInstalledError
from agent.runtimes.ort import OnnxRuntime

__all__ = ["ModelSession", "OnnxRuntime", "Runtime", "RuntimeNotInstalledError"]
