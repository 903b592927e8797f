"""Approximate nearest-neighbour search for large galleries: an HNSW graph from usearch.

usearch was picked over faiss-cpu and hnswlib for its small wheel with aarch64
builds and its batch search; benchmarks/ann_choice.py measures all three and
docs/benchmarks.md records the numbers. usearch is an optional dependency (the
`index` extra). Without it, `build_index` returns None and the gallery keeps
exact search.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

log = logging.getLogger(__name__)

INDEX_MODES = ("exact", "approximate", "auto")

# HNSW settings: graph degree, candidate list size while building and while
# searching. benchmarks/ann_choice.py measured recall@1 1.000 against exact
# search at 100k random 128-d unit rows with probes 0.7 away (faiss, same
# settings); M=16 with ef=64 gave only 0.85 to 0.89.
# NOTE: recall with these settings at 1M rows has not been measured yet.
CONNECTIVITY = 32
EXPANSION_ADD = 200
EXPANSION_SEARCH = 128


class ApproximateIndex:
    """An HNSW index over the rows of a gallery matrix, searched by inner product."""

    def __init__(self, index: object, rows: int) -> None:
        self._index = index
        self.rows = rows

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (nearest row, its dot product) for each query row."""
        found = self._index.search(queries, 1)  # type: ignore[attr-defined]
        keys = np.asarray(found.keys, dtype=np.int64).reshape(len(queries), -1)[:, 0]
        # usearch's "ip" metric reports 1 - dot as the distance.
        dots = 1.0 - np.asarray(found.distances, dtype=np.float32).reshape(len(queries), -1)[:, 0]
        return keys, dots


def build_index(vectors: np.ndarray, threads: int = 0) -> ApproximateIndex | None:
    """Build an HNSW index over `vectors`; None when usearch is not installed."""
    try:
        from usearch.index import Index
    except ImportError:
        log.warning("approximate matching requested but usearch is not installed "
                    "(pip install 'facenet-edge-agent[index]'); using exact search")
        return None

    started = time.monotonic()
    index = Index(
        ndim=vectors.shape[1],
        metric="ip",
        dtype="f32",
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )
    keys = np.arange(len(vectors), dtype=np.uint64)
    index.add(keys, np.ascontiguousarray(vectors, dtype=np.float32),
              threads=threads or os.cpu_count() or 1)
    log.info("built an HNSW index over %d rows in %.1f s", len(vectors),
             time.monotonic() - started)
    return ApproximateIndex(index, len(vectors))
