"""Enrol identities from a folder tree: one sub-folder per person, several photos each.

The folder name becomes the identity's name and, lower-cased with every run of
characters other than letters, digits, '-' and '_' replaced by '-', its id.
Each photo contributes the embedding of its largest face.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.images import ImageError, read_image
from agent.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class EnrollReport:
    identities: dict[str, int] = field(default_factory=dict)  # identity id -> embeddings stored
    skipped: list[str] = field(default_factory=list)          # "path: reason" per rejected photo
    gallery_version: int = 0


def identity_id_for(folder_name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", folder_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"folder name {folder_name!r} gives an empty identity id; rename it")
    return slug


def enroll_folder(pipeline: Pipeline, root: Path) -> EnrollReport:
    """Embed every photo under `root/<person>/` and store the embeddings in the gallery."""
    if not root.is_dir():
        raise NotADirectoryError(f"enrol folder {root} does not exist or is not a folder")
    people = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        raise ValueError(f"enrol folder {root} has no sub-folders; expected one folder per person")

    report = EnrollReport()
    for person in people:
        identity_id = identity_id_for(person.name)
        vectors, sources = _embed_person(pipeline, person, report)
        if not vectors:
            log.warning("identity %s: no usable photo in %s; nothing enrolled", identity_id, person)
            report.identities[identity_id] = 0
            continue
        report.gallery_version = pipeline.gallery.add(
            identity_id, person.name, np.stack(vectors), sources
        )
        report.identities[identity_id] = len(vectors)
    return report


def _embed_person(pipeline: Pipeline, person: Path,
                  report: EnrollReport) -> tuple[list[np.ndarray], list[str]]:
    vectors: list[np.ndarray] = []
    sources: list[str] = []
    photos = sorted(p for p in person.iterdir() if p.is_file() and not p.name.startswith("."))
    for photo in photos:
        try:
            image = read_image(photo)
        except ImageError as exc:
            _skip(report, photo, str(exc))
            continue

        faces, embeddings = pipeline.embed_faces(image)
        if not faces:
            _skip(report, photo, "no face found")
            continue
        areas = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
        largest = int(np.argmax(areas))
        if len(faces) > 1:
            log.info("%s: %d faces, enrolling the largest (bbox %s)",
                     photo, len(faces), np.round(faces[largest].bbox).tolist())
        vectors.append(embeddings[largest])
        sources.append(str(photo))
    return vectors, sources


def _skip(report: EnrollReport, photo: Path, reason: str) -> None:
    log.warning("enrol: skipped %s: %s", photo, reason)
    report.skipped.append(f"{photo}: {reason}")
