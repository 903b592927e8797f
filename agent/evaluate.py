"""`facenet-agent eval`: verification accuracy, TAR at a FAR, ROC curve and best threshold.

Input is a folder of identities (DIR/<person>/*.jpg, every pair of photos is
compared) or a pairs file (one "photo_a photo_b 1|0" line per pair, paths
relative to the file, 1 for the same person). Each photo contributes its
highest-scoring detected face, cropped as the pipeline crops it; photos
without a face are skipped and counted.

Accuracy is the share of pairs classified correctly at the best distance
threshold, in percent. The same number is the accuracy gate of `tune`: a
quantized variant that loses more than `tuning.max_accuracy_drop` points
against fp32 is never selected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.align import crop_face
from agent.detect import MtcnnDetector
from agent.embed import Embedder
from agent.images import ImageError, read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class EvaluationError(ValueError):
    """The dataset or pairs file cannot be evaluated."""


@dataclass(frozen=True)
class FaceSet:
    """One face crop per photo that had a face; labels are the identity folder names."""

    crops: np.ndarray  # (N, size, size, 3) uint8 RGB
    labels: tuple[str, ...]
    paths: tuple[Path, ...]
    skipped: tuple[Path, ...] = ()  # photos without a detected face or not decodable


@dataclass(frozen=True)
class Evaluation:
    accuracy: float  # percent of pairs right at `threshold`
    threshold: float  # Euclidean distance; a pair at a smaller distance is "same"
    target_far: float
    tar: float  # true accept rate at the largest threshold whose FAR <= target_far
    far: float  # the FAR actually reached there
    auc: float
    genuine_pairs: int
    impostor_pairs: int
    roc_far: np.ndarray = field(repr=False)
    roc_tar: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float | int]:
        return {
            "accuracy": round(self.accuracy, 3),
            "best_threshold": round(self.threshold, 4),
            "target_far": self.target_far,
            "tar_at_far": round(self.tar, 4),
            "far": round(self.far, 6),
            "auc": round(self.auc, 5),
            "genuine_pairs": self.genuine_pairs,
            "impostor_pairs": self.impostor_pairs,
        }


def identity_photos(folder: Path) -> list[tuple[Path, str]]:
    """List (photo, identity) for DIR/<identity>/<photo>, sorted; raise if fewer than two people."""
    photos = [
        (path, person.name)
        for person in sorted(p for p in folder.iterdir() if p.is_dir())
        for path in sorted(person.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    identities = {label for _, label in photos}
    if len(identities) < 2:
        raise EvaluationError(
            f"{folder}: expected sub-folders of photos for at least two identities, "
            f"found {len(identities)}"
        )
    return photos


def detect_faces(photos: list[tuple[Path, str]], detector: MtcnnDetector, margin: float,
                 size: int) -> FaceSet:
    """Crop the highest-scoring face of each photo; photos without one go to `skipped`."""
    crops, labels, paths, skipped = [], [], [], []
    for path, label in photos:
        try:
            image = read_image(path)
        except ImageError as error:
            log.warning("skipped %s: %s", path, error)
            skipped.append(path)
            continue
        faces = detector.detect(image)
        if not faces:
            log.info("skipped %s: no face found", path)
            skipped.append(path)
            continue
        best = max(faces, key=lambda face: face.score)
        crops.append(crop_face(image, best.bbox, margin, size))
        labels.append(label)
        paths.append(path)
    if not crops:
        raise EvaluationError("no face was found in any photo")
    return FaceSet(np.stack(crops), tuple(labels), tuple(paths), tuple(skipped))


def all_pairs(labels: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the index arrays (i, j) of every unordered pair and whether each is one identity."""
    first, second = np.triu_indices(len(labels), k=1)
    names = np.asarray(labels)
    return first, second, names[first] == names[second]


def read_pairs_file(path: Path) -> tuple[list[tuple[Path, str]], np.ndarray, np.ndarray,
                                         np.ndarray]:
    """Parse "photo_a photo_b 1|0" lines; return photos and the pair indices into them."""
    base = path.parent
    photos: list[tuple[Path, str]] = []
    index: dict[Path, int] = {}
    first, second, same = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[2] not in ("0", "1"):
            raise EvaluationError(
                f"{path}:{number}: expected 'photo_a photo_b 1|0', got {line!r}"
            )
        pair = []
        for name in parts[:2]:
            photo = (base / name).resolve()
            if photo not in index:
                index[photo] = len(photos)
                photos.append((photo, str(len(photos))))
            pair.append(index[photo])
        first.append(pair[0])
        second.append(pair[1])
        same.append(parts[2] == "1")
    if not same:
        raise EvaluationError(f"{path}: no pairs found")
    return photos, np.asarray(first), np.asarray(second), np.asarray(same)


def evaluate_distances(distances: np.ndarray, same: np.ndarray,
                       target_far: float = 1e-3) -> Evaluation:
    """Score pair distances against ground truth; see Evaluation for the fields."""
    same = np.asarray(same, dtype=bool)
    genuine, impostor = int(same.sum()), int((~same).sum())
    if genuine == 0 or impostor == 0:
        raise EvaluationError(
            f"need both same-person and different-person pairs, got {genuine} and {impostor}"
        )
    order = np.argsort(distances, kind="stable")
    sorted_distances = distances[order]
    sorted_same = same[order]
    # Accepting the k closest pairs, for k = 0..N.
    true_accepts = np.concatenate([[0], np.cumsum(sorted_same)])
    false_accepts = np.concatenate([[0], np.cumsum(~sorted_same)])
    tar = true_accepts / genuine
    far = false_accepts / impostor
    correct = true_accepts + (impostor - false_accepts)

    # Only cut between two different distances, so that tied pairs fall on one side.
    cuts = np.concatenate([[True], sorted_distances[1:] > sorted_distances[:-1], [True]])
    best = int(np.flatnonzero(cuts)[np.argmax(correct[cuts])])
    threshold = _threshold_at(sorted_distances, best)

    allowed = np.flatnonzero(cuts & (far <= target_far))
    at_far = int(allowed[-1])
    return Evaluation(
        accuracy=100.0 * correct[best] / len(distances),
        threshold=threshold,
        target_far=target_far,
        tar=float(tar[at_far]),
        far=float(far[at_far]),
        auc=_area_under(far[cuts], tar[cuts]),
        genuine_pairs=genuine,
        impostor_pairs=impostor,
        roc_far=far[cuts],
        roc_tar=tar[cuts],
    )


def _area_under(x: np.ndarray, y: np.ndarray) -> float:
    # The trapezoid rule, written out because np.trapezoid needs NumPy 2.
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _threshold_at(sorted_distances: np.ndarray, accepted: int) -> float:
    # Midway between the last accepted and the first rejected distance.
    if accepted == 0:
        return float(sorted_distances[0]) / 2
    if accepted == len(sorted_distances):
        return float(sorted_distances[-1]) + 1e-6
    return float(sorted_distances[accepted - 1] + sorted_distances[accepted]) / 2


def evaluate_embeddings(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray,
                        same: np.ndarray, target_far: float = 1e-3) -> Evaluation:
    distances = np.linalg.norm(embeddings[first] - embeddings[second], axis=1)
    return evaluate_distances(distances, same, target_far)


def evaluate_faces(faces: FaceSet, embedder: Embedder, target_far: float = 1e-3) -> Evaluation:
    """Embed every crop and score all pairs of the face set."""
    first, second, same = all_pairs(faces.labels)
    return evaluate_embeddings(embedder.embed(faces.crops), first, second, same, target_far)


def nearest_identity(gallery: np.ndarray, gallery_labels: tuple[str, ...],
                     probes: np.ndarray) -> list[str]:
    """Return, for each probe embedding, the label of the closest gallery embedding."""
    distances = np.linalg.norm(probes[:, None] - gallery[None], axis=2)
    return [gallery_labels[i] for i in distances.argmin(axis=1)]


def plot_roc(curves: dict[str, Evaluation], path: Path) -> Path:
    """Write a ROC plot (TAR against FAR, log FAR axis), one line per label, as PNG."""
    try:
        import matplotlib
    except ImportError:
        raise EvaluationError(
            "writing a ROC plot needs matplotlib: run 'pip install matplotlib'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for label, evaluation in curves.items():
        floor = 0.5 / max(evaluation.impostor_pairs, 1)
        axes.plot(np.maximum(evaluation.roc_far, floor), evaluation.roc_tar,
                  label=f"{label} (acc {evaluation.accuracy:.1f}%)")
    axes.set_xscale("log")
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.set_ylim(0, 1.01)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
