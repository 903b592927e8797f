"""Runtime registry and backends: missing packages, CUDA/TensorRT options, TFLite import order.

The CUDA and TensorRT paths cannot run on a machine without an NVIDIA GPU, so
their test replaces onnxruntime's InferenceSession and provider list with fakes
and checks only the options the backend passes.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.runtimes import (
    REGISTRY,
    RuntimeNotInstalledError,
    RuntimeOptions,
    create_runtime,
    installed_runtimes,
    runtime_class,
)
from agent.runtimes import tflite as tflite_module
from agent.runtimes.ort import OnnxRuntime

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_unknown_runtime_rejected():
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt': expected one of"):
        create_runtime("tensorrt")


@pytest.mark.parametrize(("name", "package"), [("onnxruntime", "onnxruntime"),
                                               ("tflite", "ai-edge-litert"),
                                               ("tensorflow", "tensorflow-cpu")])
def test_missing_runtime_names_package(monkeypatch, name, package):
    cls = runtime_class(name)
    monkeypatch.setattr(cls, "is_installed", classmethod(lambda cls: False))
    with pytest.raises(RuntimeNotInstalledError, match=f"pip install {package}"):
        create_runtime(name)


def test_registry_import_loads_no_inference_package():
    code = (
        "import sys, agent.runtimes as r, agent.pipeline, agent.selection; "
        "[r.runtime_class(n).version() for n in r.installed_runtimes()]; "
        "heavy = {'onnxruntime', 'tensorflow', 'ai_edge_litert', 'tflite_runtime'} "
        "& set(sys.modules); print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_runtimes_in_registry_order():
    assert installed_runtimes() == [n for n in REGISTRY if runtime_class(n).is_installed()]


class FakeSession:
    """Stands in for onnxruntime.InferenceSession: records what the backend passed."""

    created: list[dict] = []

    def __init__(self, path, sess_options=None, providers=None, provider_options=None):
        FakeSession.created.append({"providers": providers, "options": provider_options})
        self._providers = providers

    def get_providers(self):
        return self._providers

    def get_inputs(self):
        return [type("Input", (), {"name": "input"})()]

    def get_outputs(self):
        return [type("Output", (), {"name": "embedding"})()]


def test_tensorrt_engine_cache_keyed(monkeypatch, tmp_path):
    # Mocked: no GPU here, so onnxruntime reports the GPU providers but never runs them.
    onnxruntime = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    FakeSession.created.clear()
    model = tmp_path / "facenet-int8.onnx"
    model.write_bytes(b"not read by the fake session")
    runtime = OnnxRuntime(RuntimeOptions(accelerators=("TensorrtExecutionProvider",
                                                       "CUDAExecutionProvider"),
                                         cache_dir=tmp_path / "cache"))

    session = runtime.load(model, precision="int8", batch_size=32, sha256="ab" * 32)
    runtime.load(model, precision="fp16", batch_size=8, sha256="ab" * 32)

    first, second = FakeSession.created
    assert first["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                  "CPUExecutionProvider"]
    trt = first["options"][0]
    assert trt["trt_engine_cache_enable"] is True
    assert trt["trt_int8_enable"] is True
    assert trt["trt_engine_cache_path"] == str(
        tmp_path / "cache" / "tensorrt" / f"facenet-int8-{'ab' * 8}-int8-b32")
    assert first["options"][1:] == [{}, {}]
    assert second["options"][0]["trt_engine_cache_path"].endswith("-fp16-b8")
    assert second["options"][0]["trt_int8_enable"] is False
    assert second["options"][0]["trt_fp16_enable"] is True
    assert session.provider == "TensorrtExecutionProvider"


def test_missing_provider_falls_back_to_cpu(model_dir, caplog):
    runtime = OnnxRuntime(RuntimeOptions(accelerators=("CUDAExecutionProvider",)))
    session = runtime.load(model_dir / "rnet.onnx")
    assert session.provider == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in caplog.text


def test_tflite_import_order(monkeypatch):
    found = {"tflite_runtime", "tensorflow"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name in found else None)
    assert tflite_module._find_interpreter_module() == "tflite_runtime.interpreter"
    found.add("ai_edge_litert")
    assert tflite_module._find_interpreter_module() == "ai_edge_litert.interpreter"
    found.clear()
    found.add("tensorflow")
    assert tflite_module._find_interpreter_module() == "tensorflow.lite.python.interpreter"


def test_tflite_missing_gpu_delegate_uses_xnnpack(model_dir, caplog):
    if not runtime_class("tflite").is_installed():
        pytest.skip("no TFLite interpreter installed")
    runtime = create_runtime("tflite", RuntimeOptions(threads=1, accelerators=("gpu", "xnnpack")))
    session = runtime.load(model_dir / "rnet-fp32.tflite")
    assert session.provider == "xnnpack"
    assert "GPU delegate" in caplog.text


def test_tflite_batches_of_any_size(model_dir):
    if not runtime_class("tflite").is_installed():
        pytest.skip("no TFLite interpreter installed")
    session = create_runtime("tflite", RuntimeOptions(threads=1)).load(
        model_dir / "onet-fp32.tflite")
    batch = np.random.default_rng(0).uniform(-1, 1, (5, 48, 48, 3)).astype(np.float32)
    together = session.run(batch)
    assert set(together) == {"bbox_reg", "landmarks", "bbox_class"}
    assert together["landmarks"].shape == (5, 10)
    # Five faces run padded to eight; each row must not depend on its neighbours.
    alone = session.run(batch[2:3])
    assert np.allclose(alone["landmarks"][0], together["landmarks"][2], atol=1e-5)
