"""FaceNet embedder: prewhitened 160x160 crops in, L2-normalised embeddings out."""

from __future__ import annotations

import logging

import numpy as np

from agent.align import prewhiten
from agent.runtimes import ModelSession

log = logging.getLogger(__name__)


class Embedder:
    """Runs the embedding model in batches of at most `batch_size` faces."""

    def __init__(self, session: ModelSession, output_name: str, embedding_size: int,
                 batch_size: int) -> None:
        self.session = session
        self.output_name = output_name
        self.embedding_size = embedding_size
        self.batch_size = batch_size

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Return one unit-length float32 embedding per N x H x W x 3 uint8 RGB crop."""
        if len(crops) == 0:
            return np.empty((0, self.embedding_size), dtype=np.float32)

        return self.embed_prepared(self.prepare(crops))

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        """Convert uint8 crops to the model's float32 input."""
        return prewhiten(crops)

    def embed_prepared(self, inputs: np.ndarray) -> np.ndarray:
        """Return one unit-length embedding per prewhitened float32 crop, batch_size at a time."""
        if len(inputs) == 0:
            return np.empty((0, self.embedding_size), dtype=np.float32)
        batches = []
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start : start + self.batch_size]
            batches.append(self.session.run(batch)[self.output_name])
        raw = np.concatenate(batches, axis=0)
        return l2_normalize(raw)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale each row to unit Euclidean length; all-zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
