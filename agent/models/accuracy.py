"""Measure each embedder variant's verification accuracy on the example set at build time.

The faces are detected once with the ONNX fp32 detector, so every variant
embeds the same crops and only the embedder differs. `tune` reads the numbers
from the manifest for its accuracy gate when no evaluation dataset is configured.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.detect import MtcnnDetector
from agent.embed import Embedder
from agent.evaluate import detect_faces, evaluate_faces, identity_photos
from agent.models.manifest import Manifest
from agent.runtimes import OnnxRuntime, create_runtime, runtimes_for_format

log = logging.getLogger(__name__)

MARGIN = 0.2  # the default alignment.margin
BATCH_SIZE = 16


def measure_accuracy(manifest: Manifest, example_data: Path) -> dict[tuple[str, str], float]:
    """Return the accuracy in percent of each embedder variant, keyed by (format, precision).

    Variants whose format no installed runtime loads are left out.
    """
    onnx = OnnxRuntime()
    detector = MtcnnDetector(onnx.load(manifest.pnet.path), onnx.load(manifest.rnet.path),
                             onnx.load(manifest.onet.path))
    photos = identity_photos(example_data / "train") + identity_photos(example_data / "val")
    faces = detect_faces(photos, detector, MARGIN, manifest.image_size)

    results = {}
    for variant in manifest.variants:
        if variant.role != "embedder":
            continue
        runtimes = runtimes_for_format(variant.format)
        if not runtimes:
            log.warning("no installed runtime loads %s files; %s has no accuracy",
                        variant.format, variant.path.name)
            continue
        session = create_runtime(runtimes[0]).load(variant.path, precision=variant.precision)
        embedder = Embedder(session, manifest.embedder.outputs[0], manifest.embedding_size,
                            BATCH_SIZE)
        evaluation = evaluate_faces(faces, embedder)
        results[(variant.format, variant.precision)] = round(evaluation.accuracy, 3)
        log.info("%s on %s: accuracy %.2f%% over %d pairs of %d faces", variant.path.name,
                 runtimes[0], evaluation.accuracy,
                 evaluation.genuine_pairs + evaluation.impostor_pairs, len(faces.labels))
    return results
