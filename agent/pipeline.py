"""The recognition pipeline for one image: detect -> align -> embed -> match.

`build_pipeline` loads the models named in the manifest on the configured
runtime and warms them up. The run loop and enrolment call `Pipeline.recognize`
or `Pipeline.embed_faces` for every image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from agent.align import crop_face
from agent.config import Config
from agent.detect import Face, FaceDetector, MtcnnDetector
from agent.embed import Embedder
from agent.gallery import Gallery, Match
from agent.models.manifest import Manifest, ManifestError, load_manifest
from agent.runtimes import ModelSession, RuntimeNotInstalledError, runtime_class
from agent.tune import Selection, StageChoice, detector_layout, load_variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recognition:
    face: Face
    embedding: np.ndarray  # unit length
    match: Match


class Pipeline:
    def __init__(self, manifest: Manifest, detector: MtcnnDetector, embedder: Embedder,
                 gallery: Gallery, config: Config, selection: Selection | None = None) -> None:
        self.manifest = manifest
        self.selection = selection
        self.detector = detector
        self.embedder = embedder
        self.gallery = gallery
        self.config = config

    def prepare_faces(self, image: np.ndarray, detector: FaceDetector | None = None
                      ) -> tuple[list[Face], np.ndarray]:
        """Detect the faces in an RGB image; return them with their crops as embedder input."""
        faces = (detector or self.detector).detect(image)
        size = self.manifest.image_size
        if not faces:
            return [], np.empty((0, size, size, 3), dtype=np.float32)

        margin = self.config.alignment.margin
        crops = np.stack([crop_face(image, face.bbox, margin, size) for face in faces])
        return faces, self.embedder.prepare(crops)

    def embed_prepared(self, inputs: np.ndarray) -> np.ndarray:
        return self.embedder.embed_prepared(inputs)

    def match(self, embeddings: np.ndarray) -> list[Match]:
        matching = self.config.matching
        return self.gallery.match(embeddings, matching.threshold, matching.metric)

    def embed_faces(self, image: np.ndarray) -> tuple[list[Face], np.ndarray]:
        """Detect every face in an RGB image and return them with their embeddings."""
        faces, inputs = self.prepare_faces(image)
        return faces, self.embedder.embed_prepared(inputs)

    def recognize(self, image: np.ndarray) -> list[Recognition]:
        """Detect, embed and match every face in an RGB image."""
        faces, embeddings = self.embed_faces(image)
        matches = self.match(embeddings)
        return [
            Recognition(face, embedding, match)
            for face, embedding, match in zip(faces, embeddings, matches, strict=True)
        ]


def build_pipeline(config: Config, selection: Selection | None = None,
                   for_stages: bool = False) -> Pipeline:
    """Load and verify the models, open the gallery and warm the runtime up.

    `selection` fixes the runtimes, precision and batch size; None resolves them
    from the config, the tuning cache or a tuning run (see agent.selection).
    `for_stages` loads the embedder with the threads it gets beside the detect
    workers of agent/stages.py (see embedder_threads).
    """
    manifest = load_manifest(config.models.dir, verify=config.models.verify_sha256)
    if selection is None:
        from agent.selection import resolve_selection

        selection = resolve_selection(config, manifest)

    detector = load_detector(config, manifest, selection.detector, selection.threads)
    threads = embedder_threads(config, selection) if for_stages else selection.threads
    embedder = Embedder(
        load_session(config, manifest, "embedder", selection.embedder, threads),
        output_name=manifest.embedder.outputs[0],
        embedding_size=manifest.embedding_size,
        batch_size=selection.embedder.batch_size,
    )
    gallery = Gallery(config.gallery.path, manifest.model_id, manifest.embedding_size,
                      index_mode=config.matching.index,
                      approximate_min_rows=config.matching.approximate_min_rows)

    pipeline = Pipeline(manifest, detector, embedder, gallery, config, selection)
    _warm_up(pipeline)
    log.info(
        "pipeline ready: model %s, embedder on %s %s (%s, %d threads), batch size %d, detector "
        "on %s %s, gallery %s version %d with %d identities",
        manifest.model_id, selection.embedder.runtime, selection.embedder.precision,
        embedder.session.provider, threads, selection.embedder.batch_size,
        selection.detector.runtime,
        selection.detector.precision, config.gallery.path, gallery.version,
        gallery.identity_count,
    )
    return pipeline


def embedder_threads(config: Config, selection: Selection) -> int:
    """Return the embedder's threads when it runs beside the stages' detect workers."""
    if config.runtime.embedder_threads:
        return config.runtime.embedder_threads
    workers, _ = detector_layout(selection.threads, config.service.detect_workers)
    if workers < 2:
        return selection.threads
    # With two detect workers on two vCPUs (AMD EPYC), an embedder on one thread
    # ran the whole pipeline 3 % faster than on two. Its stage reached 95 % of the
    # session's standalone speed instead of 87 %, because its threads no longer
    # wait for a core that a detect worker holds.
    # NOTE: measured on 2 vCPUs only; on more cores the best split may differ.
    return max(1, selection.threads // 2)


def load_session(config: Config, manifest: Manifest, role: str, choice: StageChoice,
                 threads: int) -> ModelSession:
    """Load one model of the manifest on `choice`'s runtime; errors name the file and the fix."""
    try:
        session = load_variant(manifest, role, choice, threads, config.runtime.cache_dir,
                               config.models.verify_sha256)
        # The heartbeat reports this, so it must be the precision in use, not
        # the config's "auto".
        session.precision = choice.precision
        return session
    except (ManifestError, RuntimeNotInstalledError):
        raise
    except Exception as exc:
        # Each runtime raises its own types (ONNX Runtime's InvalidProtobuf, TFLite's
        # ValueError), most often for a truncated or damaged file.
        raise ManifestError(
            f"{_variant_path(manifest, role, choice)}: {choice.runtime} cannot load the "
            f"{choice.precision} {role} model: {exc}. The file may be truncated or "
            "damaged: run `facenet-agent models verify` on the folder, or rebuild it "
            "with `facenet-agent models build`"
        ) from exc


def load_detector(config: Config, manifest: Manifest, choice: StageChoice,
                  threads: int) -> MtcnnDetector:
    """Load P-Net, R-Net and O-Net into a detector with the config's detection settings."""
    detection = config.detection
    return MtcnnDetector(
        *(load_session(config, manifest, stage, choice, threads)
          for stage in ("pnet", "rnet", "onet")),
        min_face_size=detection.min_face_size,
        scale_factor=detection.scale_factor,
        thresholds=(detection.thresholds[0], detection.thresholds[1], detection.thresholds[2]),
        max_input_side=detection.max_input_side,
    )


def _variant_path(manifest: Manifest, role: str, choice: StageChoice) -> str:
    """Return the model file that `choice` loads for `role`, for error messages."""
    try:
        model_format = runtime_class(choice.runtime).model_format
    except (ImportError, ValueError):
        return f"{manifest.directory} ({role})"
    variant = manifest.variant(role, model_format, choice.precision)
    return str(variant.path) if variant is not None else f"{manifest.directory} ({role})"


def _warm_up(pipeline: Pipeline) -> None:
    # The first run of each model allocates its buffers and picks kernels; doing
    # it here keeps that cost out of the first real frame's latency.
    # A blank frame stops the cascade after P-Net, so R-Net and O-Net get their
    # own zero batches.
    size = pipeline.manifest.image_size
    detector = pipeline.detector
    detector.detect(np.zeros((120, 160, 3), dtype=np.uint8))
    detector.rnet.run(np.zeros((1, 24, 24, 3), dtype=np.float32))
    detector.onet.run(np.zeros((1, 48, 48, 3), dtype=np.float32))
    pipeline.embedder.embed(np.zeros((1, size, size, 3), dtype=np.uint8))
