"""`facenet-agent models verify` on the real built models and on damaged copies of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.models.manifest import ManifestError
from agent.models.verify import verify_model_dir


def linked_copy(model_dir: Path, destination: Path) -> Path:
    """Copy the model folder as hard links: fast, and safe as long as tests replace
    files instead of writing into them."""
    shutil.copytree(model_dir, destination, copy_function=os.link)
    return destination


def replace_file(path: Path, content: bytes) -> None:
    """Put new content at `path` without touching the inode that the cache shares."""
    path.unlink()
    path.write_bytes(content)


def variants(model_dir: Path) -> list[dict]:
    document = json.loads((model_dir / "manifest.json").read_text())
    found = document.get("variants", [])
    if not found:
        pytest.skip("these models were built without variants (models build --no-variants)")
    return found


def verify_cli(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "models", "verify", str(folder), *extra],
                          capture_output=True, text=True, timeout=300, check=False)


def test_built_models_pass(model_dir: Path) -> None:
    result = verify_cli(model_dir)

    assert result.returncode == 0, result.stderr
    assert "model files match manifest.json" in result.stdout


def test_other_formats_skipped(model_dir: Path) -> None:
    other = [v for v in variants(model_dir) if v["format"] != "onnx"]

    report = verify_model_dir(model_dir, ("onnx",))

    assert report.skipped == len(other)
    assert report.checked >= 4


def test_missing_variant_named(model_dir: Path, tmp_path: Path) -> None:
    tflite = [v for v in variants(model_dir) if v["format"] == "tflite"]
    if not tflite:
        pytest.skip("no TFLite variant was built")
    copy = linked_copy(model_dir, tmp_path / "models")
    (copy / tflite[0]["file"]).unlink()

    with pytest.raises(ManifestError, match=f"{tflite[0]['file']} is missing"):
        verify_model_dir(copy, ("onnx", "tflite"))
    # A board without a TFLite runtime does not need the file.
    assert verify_model_dir(copy, ("onnx",)).checked >= 4


def test_damaged_base_model_rejected(model_dir: Path, tmp_path: Path) -> None:
    copy = linked_copy(model_dir, tmp_path / "models")
    replace_file(copy / "pnet.onnx", b"not a model")

    result = verify_cli(copy, "--formats", "onnx")

    assert result.returncode == 2
    assert "pnet.onnx" in result.stderr


def test_damaged_folder_variant_rejected(model_dir: Path, tmp_path: Path) -> None:
    folders = [v for v in variants(model_dir) if (model_dir / v["file"]).is_dir()]
    if not folders:
        pytest.skip("no SavedModel variant was built")
    copy = linked_copy(model_dir, tmp_path / "models")
    variant = folders[0]
    replace_file(copy / variant["file"] / "saved_model.pb", b"damaged")

    with pytest.raises(ManifestError, match=f"{variant['file']} has sha256"):
        verify_model_dir(copy, (variant["format"],))


def test_unknown_format_rejected(model_dir: Path) -> None:
    result = verify_cli(model_dir, "--formats", "onnx,coreml")

    assert result.returncode == 2
    assert "unknown format 'coreml'" in result.stderr
