"""manifest.json: which model files a model directory contains, their checksums and contract.

`facenet-agent models build` writes the manifest; the agent loads it on the
device before it loads any model. This module imports only the standard
library so that the device needs neither onnx, h5py nor TensorFlow.

The manifest records, for each of the four models, the file name, sha256,
input name and shape, and output names. Its optional `variants` list adds the
same model in other formats and precisions (TFLite, SavedModel, int8 ONNX),
each with its sha256 and, for the embedder, the accuracy measured at build time.
It also records the preprocessing the embedder expects, the distance metric
and threshold, where the weights came from, and which package versions built
the files. A `content_sha256`
over the rest of the document catches edits to the manifest itself. It is a
checksum against corruption and hand edits, not a signature, so it does not
stop someone who recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("embedder", "pnet", "rnet", "onet")
PREWHITEN_FORMULA = "(x - mean) / max(std, 1/sqrt(N)), N = number of values in the image"
REBUILD_HINT = "rebuild the models with `facenet-agent models build --out DIR`"
FORMATS = ("onnx", "tflite", "savedmodel")


class ManifestError(ValueError):
    """A manifest or a model file it lists is missing, unreadable or fails its checksum."""


@dataclass(frozen=True)
class ModelFile:
    """One model file listed in the manifest; `path` is absolute after loading."""

    role: str  # "embedder", "pnet", "rnet" or "onet"
    path: Path
    sha256: str
    input_name: str
    input_shape: tuple[int | None, ...]  # NHWC; None marks a dynamic dimension
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ModelVariant:
    """One file (or SavedModel folder) of one model in one format and precision."""

    role: str
    format: str  # one of FORMATS
    precision: str  # "fp32", "fp16" or "int8"
    path: Path
    sha256: str  # of the file; of a folder, see sha256_tree
    # Verification accuracy in percent on the example set at build time; None if
    # not measured (the detector stages).
    accuracy: float | None = None


@dataclass(frozen=True)
class Manifest:
    """A verified model directory: the four models and how to feed and compare them."""

    directory: Path
    model_id: str  # identifies the embedding space; galleries are keyed by it
    model_version: str  # revision of the conversion that produced the files
    embedder: ModelFile
    pnet: ModelFile
    rnet: ModelFile
    onet: ModelFile
    embedding_size: int = 128
    metric: str = "euclidean"
    threshold: float = 1.1  # decision threshold on the distance of L2-normalised embeddings
    image_size: int = 160
    layout: str = "NHWC"
    color_order: str = "RGB"
    preprocessing: str = "prewhiten"
    # MTCNN input scaling: (pixel - mean) * scale, as mtcnn 1.0.0 applies it.
    mtcnn_normalization: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({"mean": 127.5, "scale": 0.0078125})
    )
    variants: tuple[ModelVariant, ...] = ()

    def model_files(self) -> tuple[ModelFile, ...]:
        return tuple(getattr(self, role) for role in ROLES)

    def variant(self, role: str, format: str, precision: str) -> ModelVariant | None:
        """Return the variant of `role` in `format` and `precision`, or None if not built.

        The ONNX fp32 file is always available, also from a manifest without variants.
        """
        for variant in self.variants:
            if (variant.role, variant.format, variant.precision) == (role, format, precision):
                return variant
        if (format, precision) == ("onnx", "fp32"):
            model = getattr(self, role)
            return ModelVariant(role, "onnx", "fp32", model.path, model.sha256)
        return None

    def precisions(self, role: str, format: str) -> list[str]:
        """Return the precisions built for `role` in `format`, fp32 first."""
        found = {v.precision for v in self.variants if (v.role, v.format) == (role, format)}
        if format == "onnx":
            found.add("fp32")
        return [p for p in ("fp32", "fp16", "int8") if p in found]


def sha256_tree(path: Path) -> str:
    """Return a sha256 over every file under the folder `path`: relative names and contents.

    Each file adds "<relative path>\0<sha256 of its bytes>\n", in sorted order.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        digest.update(f"{relative}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """Return sha256_tree for a folder and sha256_file for a file."""
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Writing


def write_manifest(manifest: Manifest, provenance: Mapping[str, Any]) -> Path:
    """Write manifest.json into `manifest.directory` atomically and return its path.

    `provenance` is stored as is; the builder puts the weight sources and the
    versions of the packages that built the files there.
    """
    document = _to_document(manifest, provenance)
    document["content_sha256"] = _content_sha256(document)
    path = manifest.directory / MANIFEST_NAME
    _write_atomically(path, json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def _to_document(manifest: Manifest, provenance: Mapping[str, Any]) -> dict[str, Any]:
    models = {}
    for model in manifest.model_files():
        if model.path.parent.resolve() != manifest.directory.resolve():
            raise ValueError(f"{model.path} is not inside {manifest.directory}")
        models[model.role] = {
            "file": model.path.name,
            "sha256": model.sha256,
            "input_name": model.input_name,
            "input_shape": list(model.input_shape),
            "outputs": list(model.outputs),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "model_id": manifest.model_id,
        "model_version": manifest.model_version,
        "models": models,
        "embedding": {
            "size": manifest.embedding_size,
            "metric": manifest.metric,
            "threshold": manifest.threshold,
            "l2_normalized_by_model": False,
        },
        "embedder_input": {
            "image_size": manifest.image_size,
            "layout": manifest.layout,
            "color_order": manifest.color_order,
            "preprocessing": manifest.preprocessing,
            "prewhiten_formula": PREWHITEN_FORMULA,
        },
        "mtcnn_normalization": {
            **manifest.mtcnn_normalization,
            "formula": "(x - mean) * scale",
        },
        "variants": [_variant_entry(manifest.directory, v) for v in manifest.variants],
        "provenance": dict(provenance),
    }


def _variant_entry(directory: Path, variant: ModelVariant) -> dict[str, Any]:
    if variant.path.parent.resolve() != directory.resolve():
        raise ValueError(f"{variant.path} is not inside {directory}")
    entry: dict[str, Any] = {
        "role": variant.role,
        "format": variant.format,
        "precision": variant.precision,
        "file": variant.path.name,
        "sha256": variant.sha256,
    }
    if variant.accuracy is not None:
        entry["accuracy"] = variant.accuracy
    return entry


def _content_sha256(document: Mapping[str, Any]) -> str:
    body = {key: value for key, value in document.items() if key != "content_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# Loading


def load_manifest(model_dir: Path | str, verify: bool = True) -> Manifest:
    """Read `model_dir`/manifest.json and check that every model file exists.

    With `verify`, also check the manifest's own checksum and the sha256 of
    every model file, which reads each file once (about 100 MB in all).
    Raises ManifestError on any problem.
    """
    directory = Path(model_dir).expanduser().resolve()
    path = directory / MANIFEST_NAME
    document = _read_document(path)

    if verify:
        expected = document.get("content_sha256")
        actual = _content_sha256(document)
        if expected != actual:
            raise ManifestError(
                f"{path} was modified after it was written: content_sha256 is {expected}, "
                f"the content hashes to {actual}; {REBUILD_HINT}"
            )

    try:
        manifest = _from_document(directory, document)
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{path} is invalid ({error!r}); {REBUILD_HINT}") from error

    for model in manifest.model_files():
        _check_model_file(model, verify)
    return manifest


def _read_document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ManifestError(f"model manifest not found: {path}; {REBUILD_HINT}") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"cannot read {path}: {error}; {REBUILD_HINT}") from error

    if not isinstance(document, dict):
        raise ManifestError(f"{path} is not a JSON object; {REBUILD_HINT}")
    schema = document.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema_version {schema!r}, but this agent reads version "
            f"{SCHEMA_VERSION}; {REBUILD_HINT} with this agent's version"
        )
    return document


def _from_document(directory: Path, document: Mapping[str, Any]) -> Manifest:
    models = document["models"]
    embedding = document["embedding"]
    embedder_input = document["embedder_input"]
    normalization = document["mtcnn_normalization"]
    return Manifest(
        directory=directory,
        model_id=str(document["model_id"]),
        model_version=str(document["model_version"]),
        embedder=_model_file(directory, "embedder", models["embedder"]),
        pnet=_model_file(directory, "pnet", models["pnet"]),
        rnet=_model_file(directory, "rnet", models["rnet"]),
        onet=_model_file(directory, "onet", models["onet"]),
        embedding_size=int(embedding["size"]),
        metric=str(embedding["metric"]),
        threshold=float(embedding["threshold"]),
        image_size=int(embedder_input["image_size"]),
        layout=str(embedder_input["layout"]),
        color_order=str(embedder_input["color_order"]),
        preprocessing=str(embedder_input["preprocessing"]),
        mtcnn_normalization=MappingProxyType({
            "mean": float(normalization["mean"]),
            "scale": float(normalization["scale"]),
        }),
        variants=tuple(_variant(directory, entry) for entry in document.get("variants", [])),
    )


def _variant(directory: Path, entry: Mapping[str, Any]) -> ModelVariant:
    role, format, precision = str(entry["role"]), str(entry["format"]), str(entry["precision"])
    if role not in ROLES or format not in FORMATS:
        raise ValueError(f"variant {role}/{format} is not one of {ROLES} x {FORMATS}")
    accuracy = entry.get("accuracy")
    return ModelVariant(
        role=role,
        format=format,
        precision=precision,
        path=_model_file_path(directory, role, entry),
        sha256=str(entry["sha256"]).lower(),
        accuracy=None if accuracy is None else float(accuracy),
    )


def _model_file_path(directory: Path, role: str, entry: Mapping[str, Any]) -> Path:
    name = str(entry["file"])
    # A bare file name keeps a manifest from pointing outside its own directory.
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{role} file {name!r} must be a file name inside the model directory")
    return directory / name


def _model_file(directory: Path, role: str, entry: Mapping[str, Any]) -> ModelFile:
    return ModelFile(
        role=role,
        path=_model_file_path(directory, role, entry),
        sha256=str(entry["sha256"]).lower(),
        input_name=str(entry["input_name"]),
        input_shape=tuple(None if d is None else int(d) for d in entry["input_shape"]),
        outputs=tuple(str(output) for output in entry["outputs"]),
    )


def _check_model_file(model: ModelFile, verify: bool) -> None:
    if not model.path.is_file():
        raise ManifestError(f"{model.role} model file not found: {model.path}; {REBUILD_HINT}")
    if not verify:
        return
    actual = sha256_file(model.path)
    if actual != model.sha256:
        raise ManifestError(
            f"{model.role} model file {model.path} failed its checksum: expected sha256 "
            f"{model.sha256}, got {actual}. The file is corrupt or was replaced; "
            f"{REBUILD_HINT}"
        )


def check_variant(variant: ModelVariant, verify: bool = True) -> None:
    """Check that a variant's file exists and, with `verify`, that its sha256 matches.

    load_manifest checks only the four ONNX fp32 files, so that a start does not
    hash every variant; callers check the variant they are about to load.
    """
    if not variant.path.exists():
        raise ManifestError(
            f"{variant.role} {variant.format} {variant.precision} model not found: "
            f"{variant.path}; {REBUILD_HINT}"
        )
    if not verify:
        return
    actual = sha256_path(variant.path)
    if actual != variant.sha256:
        raise ManifestError(
            f"{variant.role} {variant.format} {variant.precision} model {variant.path} failed "
            f"its checksum: expected sha256 {variant.sha256}, got {actual}. The file is "
            f"corrupt or was replaced; {REBUILD_HINT}"
        )
