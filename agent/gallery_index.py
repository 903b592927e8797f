"""Approximate nearest-neighbour search for large galleries, with faiss.

The index is a 4-bit product quantizer scanned with SIMD (faiss
IndexPQFastScan) inside an IndexRefineFlat. The scan ranks every row by a dot
product estimated from its code, one 4-bit code per SUBQUANTIZER_DIMENSIONS
dimensions. The best REFINE_FACTOR rows are then reranked by their exact
float32 dot product, so the returned dot product is exact. A query misses its
nearest row only when the estimate ranks REFINE_FACTOR other rows above it.

benchmarks/ann_choice.py compared it with faiss HNSW on 2 shared AMD EPYC
cores, and docs/benchmarks.md records the numbers. At 1M random 128-d rows it
found the nearest row for every probe at distance 0.7 from a gallery row. At
distance 1.0 it found it for 0.980 of the probes. A batch of 32 took 12.7 to
12.9 ms on 2 threads. HNSW (M=32, efSearch 256) needed 29 ms for recall 0.991 at distance
0.7, and HNSW over 8-bit rows found only 0.778 at distance 1.0 (efSearch 384).
The index builds in about 3 s at 1M rows, where HNSW took 35 to 42 minutes on
shared cores, so each change rebuilds it whole. IndexRefineFlat keeps its own
float32 copy of the rows for the rerank: the index adds 521 MiB at 1M rows,
against 749 MiB for HNSW. The scan reads every row's code, so its time grows
linearly with the gallery.

faiss was chosen over usearch and hnswlib when the index was HNSW: at 100k rows
it reached recall 1.000 at efSearch 64, where the others needed 128. hnswlib
0.8.0 has no Linux wheels on PyPI, so every board would compile it. faiss-cpu's
aarch64 wheel is larger than usearch's (9.9 MB against 2.2 MB). faiss-cpu is an
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

# Dimensions per 4-bit subquantizer, so a 128-d row has a 16-byte code. With 8
# dimensions (8 bytes) a batch took 7.8 ms instead of 11.8 ms, but at distance
# 1.0 the nearest row was among the best 1,024 estimates for only 0.753 of the
# probes.
SUBQUANTIZER_DIMENSIONS = 4
# Candidates reranked exactly per query. At 1M random rows and distance 1.0, 128
# kept the nearest row for 0.958 of the probes, 256 for 0.980 and 512 for 0.992,
# at 12.0, 12.7 and 14.1 ms per batch of 32 (all 1.000 at distance 0.7).
REFINE_FACTOR = 256
# Rows sampled to train the quantizer. faiss trains each subquantizer's 16
# centroids on at most 256 rows per centroid, so more rows only cost time.
TRAIN_ROWS = 20_000
# Below this many rows the index scans the float32 rows instead (IndexFlatIP),
# because the quantizer would be trained on too few rows, and a full exact scan
# of so few rows is cheap.
MIN_QUANTIZED_ROWS = 1_000
# Rows added per call while building, so that a cancelled build stops soon.
BUILD_SLICE_ROWS = 100_000


class ApproximateIndex:
    """A faiss index over the rows of a gallery matrix, searched by inner product."""

    def __init__(self, index: object, rows: int) -> None:
        self._index = index
        self.rows = rows

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (nearest row, its exact dot product) for each query row.

        The row is -1 when the index found none.
        """
        dots, rows = self._index.search(  # type: ignore[attr-defined]
            np.ascontiguousarray(queries, dtype=np.float32), 1)
        return rows[:, 0].astype(np.int64), dots[:, 0]


def subquantizer_count(dimension: int) -> int:
    """Return the fewest subquantizers that divide `dimension` evenly into parts of at
    most SUBQUANTIZER_DIMENSIONS dimensions."""
    for count in range(-(-dimension // SUBQUANTIZER_DIMENSIONS), dimension + 1):
        if dimension % count == 0:
            return count
    return dimension


def build_index(vectors: np.ndarray, threads: int = 0,
                cancelled: Callable[[], bool] | None = None) -> ApproximateIndex | None:
    """Build a quantized index over `vectors` that reranks its candidates exactly.

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
    rows, dimension = vectors.shape
    index: faiss.Index
    if rows < MIN_QUANTIZED_ROWS:
        index = faiss.IndexFlatIP(dimension)
    else:
        quantized = faiss.IndexPQFastScan(dimension, subquantizer_count(dimension), 4,
                                          faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(rows, min(rows, TRAIN_ROWS), replace=False)
        quantized.train(np.ascontiguousarray(vectors[np.sort(sample)], dtype=np.float32))
        refined = faiss.IndexRefineFlat(quantized)
        refined.k_factor = REFINE_FACTOR
        index = refined
    for start in range(0, rows, BUILD_SLICE_ROWS):
        if cancelled is not None and cancelled():
            log.info("index build cancelled after %d of %d rows", start, rows)
            return None
        index.add(np.ascontiguousarray(vectors[start:start + BUILD_SLICE_ROWS],
                                       dtype=np.float32))
    log.info("built a %s index over %d rows in %.1f s", type(index).__name__, rows,
             time.monotonic() - started)
    return ApproximateIndex(index, rows)
