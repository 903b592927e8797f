"""Compare usearch, faiss-cpu and hnswlib HNSW indexes against exact search.

For each library: build time, batch-of-32 query latency, recall@1 against
exact search, on random 128-d unit vectors with probes at a FaceNet-like
distance (0.7) from a gallery row. Libraries that are not installed are
skipped. Usage:

    python benchmarks/ann_choice.py --rows 100000 [--libraries usearch,faiss,hnswlib]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, exact_nearest, machine_line, probes_near, unit_rows  # noqa: E402

DIMENSION = 128
BATCH = 32
CONNECTIVITY = 16  # HNSW graph degree M; --connectivity overrides
EXPANSION_ADD = 128  # ef_construction; --ef-construction overrides


def build_usearch(vectors: np.ndarray, ef_search: int, threads: int):
    from usearch.index import Index

    index = Index(ndim=DIMENSION, metric="ip", dtype="f32", connectivity=CONNECTIVITY,
                  expansion_add=EXPANSION_ADD, expansion_search=ef_search)
    index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=threads)

    def search(queries: np.ndarray) -> np.ndarray:
        return np.asarray(index.search(queries, 1, threads=threads).keys).reshape(-1)

    return search, index.memory_usage


def build_faiss(vectors: np.ndarray, ef_search: int, threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexHNSWFlat(DIMENSION, CONNECTIVITY, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EXPANSION_ADD
    index.hnsw.efSearch = ef_search
    index.add(vectors)

    def search(queries: np.ndarray) -> np.ndarray:
        return index.search(queries, 1)[1].reshape(-1)

    return search, None


def build_hnswlib(vectors: np.ndarray, ef_search: int, threads: int):
    import hnswlib

    index = hnswlib.Index(space="ip", dim=DIMENSION)
    index.init_index(max_elements=len(vectors), ef_construction=EXPANSION_ADD, M=CONNECTIVITY)
    index.set_num_threads(threads)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_ef(ef_search)

    def search(queries: np.ndarray) -> np.ndarray:
        return index.knn_query(queries, k=1)[0].reshape(-1)

    return search, None


BUILDERS = {"usearch": build_usearch, "faiss": build_faiss, "hnswlib": build_hnswlib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="gallery rows")
    parser.add_argument("--queries", type=int, default=1000, help="probes for recall")
    parser.add_argument("--libraries", default="usearch,faiss,hnswlib")
    parser.add_argument("--ef-search", default="32,64,128", help="search candidate list sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for building and searching")
    parser.add_argument("--connectivity", type=int, default=16, help="HNSW M")
    parser.add_argument("--ef-construction", type=int, default=128)
    args = parser.parse_args()
    globals().update(CONNECTIVITY=args.connectivity, EXPANSION_ADD=args.ef_construction)

    print(f"# {machine_line()}")
    print(f"# {args.rows} rows x {DIMENSION}, M={CONNECTIVITY}, ef_construction={EXPANSION_ADD}, "
          f"{args.threads} threads")
    gallery = unit_rows(args.rows, DIMENSION, seed=1)
    near = probes_near(gallery, args.queries, distance=0.7, seed=2)
    far = unit_rows(args.queries, DIMENSION, seed=3)
    truth_near = exact_nearest(gallery, near)
    truth_far = exact_nearest(gallery, far)
    batch = near[:BATCH]
    exact_min, exact_median = best_of(20, lambda: np.argmax(batch @ gallery.T, axis=1))
    print(f"exact numpy: batch of {BATCH} min {exact_min * 1e3:.2f} ms "
          f"median {exact_median * 1e3:.2f} ms")

    for name in args.libraries.split(","):
        try:
            __import__({"faiss": "faiss", "usearch": "usearch", "hnswlib": "hnswlib"}[name])
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        for ef in (int(v) for v in args.ef_search.split(",")):
            started = time.perf_counter()
            search, memory = BUILDERS[name](gallery, ef, args.threads)
            built = time.perf_counter() - started
            recall_near = float(np.mean(search(near) == truth_near))
            recall_far = float(np.mean(search(far) == truth_far))
            query_min, query_median = best_of(50, lambda search=search: search(batch))
            memory_text = f", index {memory() / 2**20:.0f} MiB" if callable(memory) else ""
            print(f"{name} ef={ef}: build {built:.1f} s, batch of {BATCH} min "
                  f"{query_min * 1e3:.2f} ms median {query_median * 1e3:.2f} ms, "
                  f"recall@1 near {recall_near:.4f} random {recall_far:.4f}{memory_text}",
                  flush=True)
            # A rebuild per ef keeps the libraries comparable; only ef differs.


if __name__ == "__main__":
    main()
