"""Compare faiss-cpu, usearch and hnswlib HNSW indexes against exact search.

For each library: build time, memory, and for each search candidate list size
(ef): batch-of-32 query latency and recall@1 against exact search. The gallery is
random 128-d unit vectors. "near" probes lie at Euclidean distance 0.7 from a
gallery row, as two photos of one person do with FaceNet, and "random" probes are
unrelated unit vectors. The index is built once per library, and ef is changed
between searches, which all three allow. Libraries that are not installed are
skipped. "faiss-ivf" builds faiss's IVFFlat with 4 * sqrt(rows) lists instead,
and reads the ef values as the number of lists to search. A faiss HNSW index
can be saved and loaded again, to repeat the searches without the build, which
took 42 minutes at 1M rows on the 2 shared cores of docs/benchmarks.md. Usage:

    python benchmarks/ann_choice.py --rows 100000 [--libraries faiss,usearch,hnswlib]
    python benchmarks/ann_choice.py --rows 1000000 --libraries faiss --index-file /tmp/1m.faiss
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, exact_nearest, machine_line, probes_near, unit_rows  # noqa: E402

DIMENSION = 128
BATCH = 32

Search = Callable[[np.ndarray], np.ndarray]


def build_faiss(vectors: np.ndarray, connectivity: int, ef_construction: int,
                threads: int, index_file: Path | None = None
                ) -> tuple[Search, Callable[[int], None]]:
    import faiss

    faiss.omp_set_num_threads(threads)
    if index_file is not None and index_file.exists():
        index = faiss.read_index(str(index_file))
        if index.ntotal != len(vectors):
            raise SystemExit(f"{index_file} has {index.ntotal} rows, not {len(vectors)}")
    else:
        index = faiss.IndexHNSWFlat(DIMENSION, connectivity, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vectors)
        if index_file is not None:
            faiss.write_index(index, str(index_file))
    faiss.omp_set_num_threads(SEARCH_THREADS)

    def set_ef(ef: int) -> None:
        index.hnsw.efSearch = ef

    def search(queries: np.ndarray) -> np.ndarray:
        return index.search(queries, 1)[1].reshape(-1)

    return search, set_ef


def build_usearch(vectors: np.ndarray, connectivity: int, ef_construction: int,
                  threads: int, index_file: Path | None = None
                  ) -> tuple[Search, Callable[[int], None]]:
    from usearch.index import Index

    index = Index(ndim=DIMENSION, metric="ip", dtype="f32", connectivity=connectivity,
                  expansion_add=ef_construction)
    index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=threads)

    def set_ef(ef: int) -> None:
        index.expansion_search = ef

    def search(queries: np.ndarray) -> np.ndarray:
        return np.asarray(index.search(queries, 1, threads=SEARCH_THREADS).keys).reshape(-1)

    return search, set_ef


def build_hnswlib(vectors: np.ndarray, connectivity: int, ef_construction: int,
                  threads: int, index_file: Path | None = None
                  ) -> tuple[Search, Callable[[int], None]]:
    import hnswlib

    index = hnswlib.Index(space="ip", dim=DIMENSION)
    index.init_index(max_elements=len(vectors), ef_construction=ef_construction, M=connectivity)
    index.set_num_threads(threads)
    index.add_items(vectors, np.arange(len(vectors)))
    index.set_num_threads(SEARCH_THREADS)

    def search(queries: np.ndarray) -> np.ndarray:
        return index.knn_query(queries, k=1)[0].reshape(-1)

    return search, index.set_ef


def build_faiss_ivf(vectors: np.ndarray, connectivity: int, ef_construction: int,
                    threads: int, index_file: Path | None = None
                    ) -> tuple[Search, Callable[[int], None]]:
    """Build faiss's inverted file index; `ef` values are read as nprobe (lists searched)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    lists = max(1, int(4 * np.sqrt(len(vectors))))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIMENSION), DIMENSION, lists,
                               faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 40 * lists),
                                             replace=False)
    index.train(vectors[sample])
    index.add(vectors)
    faiss.omp_set_num_threads(SEARCH_THREADS)

    def set_ef(ef: int) -> None:
        index.nprobe = ef

    def search(queries: np.ndarray) -> np.ndarray:
        return index.search(queries, 1)[1].reshape(-1)

    return search, set_ef


BUILDERS = {"faiss": build_faiss, "usearch": build_usearch, "hnswlib": build_hnswlib,
            "faiss-ivf": build_faiss_ivf}
SEARCH_THREADS = 1  # --search-threads sets it


def rss_mib() -> float:
    """Return this process's resident memory now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="gallery rows")
    parser.add_argument("--queries", type=int, default=1000, help="probes for recall")
    parser.add_argument("--libraries", default="faiss,usearch,hnswlib")
    parser.add_argument("--ef-search", default="32,64,128,256",
                        help="search candidate list sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for building")
    parser.add_argument("--search-threads", type=int, default=os.cpu_count() or 1,
                        help="threads for searching; 1 gives latencies that another "
                             "process on the machine disturbs least")
    parser.add_argument("--connectivity", type=int, default=32, help="HNSW M")
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--index-file", type=Path, default=None,
                        help="faiss only: load the index from this file if it exists, else "
                             "build it and save it there")
    args = parser.parse_args()
    global SEARCH_THREADS
    SEARCH_THREADS = args.search_threads

    print(f"# {machine_line()}")
    print(f"# {args.rows} rows x {DIMENSION}, M={args.connectivity}, "
          f"ef_construction={args.ef_construction}, {args.threads} threads to build, "
          f"{args.search_threads} to search", flush=True)
    gallery = unit_rows(args.rows, DIMENSION, seed=1)
    near = probes_near(gallery, args.queries, distance=0.7, seed=2)
    far = unit_rows(args.queries, DIMENSION, seed=3)
    truth_near = exact_nearest(gallery, near)
    truth_far = exact_nearest(gallery, far)
    batch = near[:BATCH]
    print(f"# probes ready, RSS {rss_mib():.0f} MiB", flush=True)

    for name in args.libraries.split(","):
        try:
            __import__(name.split("-")[0])
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        rss_before = rss_mib()
        started = time.perf_counter()
        search, set_ef = BUILDERS[name](gallery, args.connectivity, args.ef_construction,
                                        args.threads, args.index_file)
        built = time.perf_counter() - started
        print(f"{name}: build or load {built:.1f} s ({args.rows / built:.0f} rows/s), index "
              f"adds {rss_mib() - rss_before:.0f} MiB RSS, load {os.getloadavg()[0]:.1f}",
              flush=True)
        for ef in (int(v) for v in args.ef_search.split(",")):
            set_ef(ef)
            recall_near = float(np.mean(search(near) == truth_near))
            recall_far = float(np.mean(search(far) == truth_far))
            query_min, query_median = best_of(50, lambda search=search: search(batch))
            print(f"{name} ef={ef}: batch of {BATCH} min {query_min * 1e3:.2f} ms "
                  f"median {query_median * 1e3:.2f} ms, recall@1 near {recall_near:.4f} "
                  f"random {recall_far:.4f}, load {os.getloadavg()[0]:.1f}", flush=True)
        del search, set_ef


if __name__ == "__main__":
    main()
