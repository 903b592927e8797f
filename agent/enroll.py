"""Enrol identities from a folder tree: one sub-folder per person, several photos each.

The folder name becomes the identity's name and, NFC-normalised and lower-cased
with every run of characters other than Unicode letters, digits, '-' and '_'
replaced by '-', its id. Each photo contributes the embedding of its largest face;
a photo whose path is already stored for the identity is skipped.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import defaultdict
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


class EnrollError(ValueError):
    """Folder names that cannot be enrolled; the message names each folder and the fix."""


def identity_id_for(folder_name: str) -> str:
    """Return the identity id for a person folder name, or raise ValueError when empty."""
    normalised = unicodedata.normalize("NFC", folder_name).lower()
    # \w matches Unicode letters, digits and '_', so 'José' and '王小明' keep their letters.
    slug = re.sub(r"[^\w-]+", "-", normalised).strip("-")
    if not slug:
        raise ValueError(f"folder name {folder_name!r} gives an empty identity id; rename it")
    return slug


def identity_ids(people: list[Path]) -> dict[Path, str]:
    """Map each person folder to its identity id.

    Raises EnrollError naming every folder whose id is empty and every group of
    folders that give the same id, so nothing is enrolled from a tree with a clash.
    """
    ids: dict[Path, str] = {}
    problems: list[str] = []
    by_id: dict[str, list[Path]] = defaultdict(list)
    for person in people:
        try:
            identity_id = identity_id_for(person.name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        ids[person] = identity_id
        by_id[identity_id].append(person)

    for identity_id, folders in by_id.items():
        if len(folders) > 1:
            names = " and ".join(repr(folder.name) for folder in folders)
            problems.append(f"folders {names} give the same identity id {identity_id!r}; "
                            "rename one of them or merge their photos into one folder")
    if problems:
        raise EnrollError("cannot enrol: " + "; ".join(problems))
    return ids


def enroll_folder(pipeline: Pipeline, root: Path) -> EnrollReport:
    """Embed every photo under `root/<person>/` and store the embeddings in the gallery.

    Every folder name is checked before anything is stored; see `identity_ids`.
    """
    if not root.is_dir():
        raise NotADirectoryError(f"enrol folder {root} does not exist or is not a folder")
    people = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        raise ValueError(f"enrol folder {root} has no sub-folders; expected one folder per person")
    loose = sorted(p.name for p in root.iterdir() if not p.is_dir() and not p.name.startswith("."))
    if loose:
        log.warning("enrol: ignored %d files at the top of %s (%s); put each person's photos "
                    "in a sub-folder named after the person", len(loose), root,
                    ", ".join(loose[:5]) + (", ..." if len(loose) > 5 else ""))
    ids = identity_ids(people)

    report = EnrollReport()
    for person in people:
        identity_id = ids[person]
        stored = pipeline.gallery.sources(identity_id)
        vectors, sources = _embed_person(pipeline, person, report, stored)
        if not vectors:
            if stored:
                log.info("identity %s: every photo in %s is already enrolled", identity_id, person)
            else:
                log.warning("identity %s: no usable photo in %s; nothing enrolled",
                            identity_id, person)
            report.identities[identity_id] = 0 if not stored else len(stored)
            continue
        report.gallery_version = pipeline.gallery.add(
            identity_id, person.name, np.stack(vectors), sources
        )
        report.identities[identity_id] = len(vectors) + len(stored)
    return report


def _embed_person(pipeline: Pipeline, person: Path, report: EnrollReport,
                  skip_sources: set[str] | frozenset[str] = frozenset(),
                  ) -> tuple[list[np.ndarray], list[str]]:
    vectors: list[np.ndarray] = []
    sources: list[str] = []
    entries = sorted(p for p in person.iterdir() if not p.name.startswith("."))
    for folder in (p for p in entries if p.is_dir()):
        log.warning("enrol: ignored sub-folder %s; only photos directly in %s are enrolled",
                    folder, person)
    photos = [p for p in entries if p.is_file()]
    for photo in photos:
        source = str(photo.absolute())
        if source in skip_sources or str(photo) in skip_sources:
            log.info("enrol: %s is already enrolled; skipped", photo)
            continue
        try:
            image = read_image(photo)
        except ImageError as exc:
            # ImageError messages already start with the path.
            _skip(report, photo, str(exc).removeprefix(f"{photo}: "))
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
        sources.append(source)
    return vectors, sources


def _skip(report: EnrollReport, photo: Path, reason: str) -> None:
    log.warning("enrol: skipped %s: %s", photo, reason)
    report.skipped.append(f"{photo}: {reason}")
