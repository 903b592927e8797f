"""Accuracy of each runtime and precision on a labelled dataset: `eval` and the tuning gate.

The faces are detected once, with the fp32 detector of the first runtime
given, so every variant embeds the same crops and only the embedder differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.config import Config
from agent.detect import MtcnnDetector
from agent.device import DeviceProfile
from agent.embed import Embedder
from agent.evaluate import (
    Evaluation,
    FaceSet,
    all_pairs,
    detect_faces,
    evaluate_embeddings,
    identity_photos,
    read_pairs_file,
)
from agent.models.manifest import Manifest
from agent.runtimes import runtime_class
from agent.tune import StageChoice, candidate_runtimes, load_variant

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 16


@dataclass(frozen=True)
class VariantEvaluation:
    runtime: str
    precision: str
    model_format: str
    evaluation: Evaluation


def load_dataset(manifest: Manifest, dataset: Path, detector: MtcnnDetector,
                 margin: float) -> tuple[FaceSet, np.ndarray, np.ndarray, np.ndarray]:
    """Detect the faces of a folder of identities or a pairs file; return them and the pairs."""
    if dataset.is_file():
        photos, first, second, same = read_pairs_file(dataset)
        faces = detect_faces(photos, detector, margin, manifest.image_size)
        # Pairs whose photo had no face are dropped; map photo indices to crop indices.
        position = {path: i for i, path in enumerate(faces.paths)}
        paths = [path for path, _ in photos]
        keep = [i for i in range(len(same))
                if paths[first[i]] in position and paths[second[i]] in position]
        if len(keep) < len(same):
            log.warning("%d of %d pairs dropped: a photo had no face", len(same) - len(keep),
                        len(same))
        first = np.asarray([position[paths[first[i]]] for i in keep], dtype=np.intp)
        second = np.asarray([position[paths[second[i]]] for i in keep], dtype=np.intp)
        return faces, first, second, same[keep]
    faces = detect_faces(identity_photos(dataset), detector, margin, manifest.image_size)
    first, second, same = all_pairs(faces.labels)
    return faces, first, second, same


def evaluate_variants(manifest: Manifest, dataset: Path, plans: list[StageChoice],
                      threads: int, margin: float, target_far: float = 1e-3,
                      cache_dir: Path | None = None) -> list[VariantEvaluation]:
    """Evaluate the embedder for each (runtime, precision) in `plans` on `dataset`."""
    first_choice = StageChoice(plans[0].runtime, "fp32", plans[0].accelerators)
    detector = MtcnnDetector(*(load_variant(manifest, stage, first_choice, threads, cache_dir)
                               for stage in ("pnet", "rnet", "onet")))
    faces, first, second, same = load_dataset(manifest, dataset, detector, margin)
    log.info("evaluating on %d faces from %s (%d photos without a face)", len(faces.labels),
             dataset, len(faces.skipped))

    results = []
    for plan in plans:
        session = load_variant(manifest, "embedder", plan, threads, cache_dir)
        embedder = Embedder(session, manifest.embedder.outputs[0], manifest.embedding_size,
                            plan.batch_size or EVAL_BATCH_SIZE)
        evaluation = evaluate_embeddings(embedder.embed(faces.crops), first, second, same,
                                         target_far)
        model_format = runtime_class(plan.runtime).model_format
        results.append(VariantEvaluation(plan.runtime, plan.precision, model_format,
                                         evaluation))
        log.info("%s %s: accuracy %.2f%%, TAR %.3f at FAR %.4f, threshold %.3f", plan.runtime,
                 plan.precision, evaluation.accuracy, evaluation.tar, evaluation.far,
                 evaluation.threshold)
    return results


def gate_plans(manifest: Manifest, profile: DeviceProfile) -> list[StageChoice]:
    """Return every installed runtime x built precision that the profile allows."""
    plans = []
    for runtime, accelerators in candidate_runtimes(profile):
        model_format = runtime_class(runtime).model_format
        for precision in manifest.precisions("embedder", model_format):
            if precision in profile.precisions:
                plans.append(StageChoice(runtime, precision, accelerators))
    return plans


def measure_gate_accuracy(config: Config, manifest: Manifest, profile: DeviceProfile,
                          dataset: Path) -> dict[tuple[str, str], float]:
    """Return accuracy in percent keyed by (model format, precision) for the tuning gate."""
    results = evaluate_variants(manifest, dataset, gate_plans(manifest, profile),
                                config.runtime.threads or profile.threads,
                                config.alignment.margin, cache_dir=config.runtime.cache_dir)
    return {(r.model_format, r.precision): r.evaluation.accuracy for r in results}
