"""Approximate nearest-neighbour search for large galleries: an HNSW graph from faiss.

benchmarks/ann_choice.py compares faiss-cpu, usearch and hnswlib with the same
HNSW settings, and docs/benchmarks.md records the numbers. At 100k rows with one
search thread, faiss found the exact nearest row for every near probe at
efSearch 64 in 9.6 ms per batch of 32 faces. hnswlib took as long for recall
0.996 at that ef and usearch twice as long for 0.997. hnswlib 0.8.0 has no
Linux wheels on PyPI, so every board would compile it. faiss-cpu's aarch64
wheel is larger than usearch's (9.9 MB against 2.2 MB). faiss-cpu is an
optional dependency (the `index` extra). Without it, `build_index` returns None
and the gallery keeps exact search.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

INDEX_MODES = ("exact", "approximate", "auto")

# HNSW settings: graph degree M, and the candidate list sizes while building
# (efConstruction) and while searching (efSearch). benchmarks/ann_choice.py
# measured recall@1 1.000 against exact search with efSearch 64 at 100k random
# 128-d rows, but only 0.823 at 1M rows, where efSearch 384 was needed for 1.000
# (0.991 at 256). docs/benchmarks.md has the latencies.
CONNECTIVITY = 32
EXPANSION_ADD = 200
EXPANSION_SEARCH_SMALL = 64
SMALL_INDEX_ROWS = 100_000
# NOTE: between 100k and 1M rows recall was not measured; 384 is the 1M value.
EXPANSION_SEARCH_LARGE = 384
# Rows added per call while building, so that a cancelled build stops soon.
BUILD_SLICE_ROWS = 20_000


class ApproximateIndex:
    """An HNSW index over the rows of a gallery matrix, searched by inner product."""

    def __init__(self, index: object, rows: int) -> None:
        self._index = index
        self.rows = rows

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (nearest row, its dot product) for each query row; row -1 when none was found."""
        dots, rows = self._index.search(  # type: ignore[attr-defined]
            np.ascontiguousarray(queries, dtype=np.float32), 1)
        return rows[:, 0].astype(np.int64), dots[:, 0]


def search_expansion(rows: int) -> int:
    """Return the efSearch that reached recall@1 1.000 in the benchmark at this size."""
    return EXPANSION_SEARCH_SMALL if rows <= SMALL_INDEX_ROWS else EXPANSION_SEARCH_LARGE


def build_index(vectors: np.ndarray, threads: int = 0,
                cancelled: Callable[[], bool] | None = None) -> ApproximateIndex | None:
    """Build an HNSW index over `vectors`.

    Returns None when faiss is not installed, or when `cancelled()` turns true
    between two slices of BUILD_SLICE_ROWS rows.
    """
    try:
        import faiss
    except ImportError:
        log.warning("approximate matching requested but faiss is not installed "
                    "(pip install 'facenet-edge-agent[index]'); using exact search")
        return None

    started = time.monotonic()
    # faiss uses OpenMP, whose thread count is one setting for the whole process.
    faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
    index = faiss.IndexHNSWFlat(vectors.shape[1], CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EXPANSION_ADD
    index.hnsw.efSearch = search_expansion(len(vectors))
    for start in range(0, len(vectors), BUILD_SLICE_ROWS):
        if cancelled is not None and cancelled():
            log.info("HNSW index build cancelled after %d of %d rows", start, len(vectors))
            return None
        index.add(np.ascontiguousarray(vectors[start:start + BUILD_SLICE_ROWS],
                                       dtype=np.float32))
    log.info("built an HNSW index over %d rows in %.1f s", len(vectors),
             time.monotonic() - started)
    return ApproximateIndex(index, len(vectors))
