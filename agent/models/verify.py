"""`facenet-agent models verify`: check an installed model folder against its manifest.

A deployment copies a model folder to a board and runs this there, so the
check uses the same sha256 rules as the agent: a file's bytes, or for a
folder such as a SavedModel, `sha256_tree`. A board may get only the
formats that its runtimes load. The four ONNX fp32 models are always
required, and so is every variant in a requested format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.models.manifest import FORMATS, ManifestError, load_manifest, sha256_path


@dataclass(frozen=True)
class VerifyReport:
    """Result of `verify_model_dir` for one model folder."""

    directory: Path
    checked: int  # files and folders whose sha256 matched
    skipped: int  # variants in formats that were not requested


def verify_model_dir(directory: Path, formats: tuple[str, ...] = FORMATS) -> VerifyReport:
    """Check the manifest, the four base models and every variant in `formats`.

    Raises ManifestError naming the first file that is missing or whose sha256
    differs from the manifest, and ValueError on an unknown format.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown model format {unknown[0]!r}; expected one of "
                         f"{', '.join(FORMATS)}")

    # Checks content_sha256 and the sha256 of the four ONNX fp32 models.
    manifest = load_manifest(directory, verify=True)
    checked = len(manifest.model_files())
    base_paths = {model.path for model in manifest.model_files()}

    skipped = 0
    for variant in manifest.variants:
        if variant.format not in formats:
            skipped += 1
            continue
        if variant.path in base_paths:
            continue  # the ONNX fp32 variant is a base model, checked above
        if not variant.path.exists():
            raise ManifestError(f"{variant.path} is missing: the manifest lists it as the "
                                f"{variant.role} {variant.format} {variant.precision} variant")
        actual = sha256_path(variant.path)
        if actual != variant.sha256:
            raise ManifestError(f"{variant.path} has sha256 {actual}, but the manifest "
                                f"expects {variant.sha256}; copy the model folder again")
        checked += 1
    return VerifyReport(manifest.directory, checked, skipped)
