"""Compare approximate nearest-neighbour indexes (faiss-cpu, usearch, hnswlib) against exact search.

For each library: build time, memory, and for each search candidate list size
(ef): batch-of-32 and single-query latency and recall@1 against exact search.
The gallery is random 128-d unit vectors. "near" probes lie at Euclidean
distance 0.7 (--near-distance) from a gallery row, as two photos of one person
do with FaceNet, and "random" probes are unrelated unit vectors. The index is
built once per library, and ef is changed between searches, which all allow.
Libraries that are not installed are skipped. "faiss", "usearch" and "hnswlib"
build HNSW graphs of degree --connectivity. The other faiss variants read the ef
values differently:

- faiss-ivf: IVFFlat with 4 * sqrt(rows) lists; ef is the number of lists searched.
- faiss-ivfsq: the same lists with an HNSW coarse quantizer, 8-bit rows and an
  exact rerank of --refine-factor candidates; ef is the number of lists searched.
- faiss-hnswsq: HNSW over 8-bit or fp16 rows (--quantizer) with an exact rerank of
  --refine-factor candidates; ef is efSearch.
- faiss-pqfs: a 4-bit product quantizer of --pq-subquantizers parts, scanned in
  full with SIMD; ef is the number of candidates reranked exactly.
- agent: the index that agent/gallery_index.py builds, with its own settings;
  ef is ignored.

A faiss index can be saved and loaded again (--index-file), to repeat the
searches without the build, which took 42 minutes for HNSW at 1M rows on the 2
shared cores of docs/benchmarks.md. Usage:

    python benchmarks/ann_choice.py --rows 100000 [--libraries faiss,usearch,hnswlib]
    python benchmarks/ann_choice.py --rows 1000000 --libraries faiss --index-file /tmp/1m.faiss
    python benchmarks/ann_choice.py --rows 1000000 --libraries faiss-pqfs \
        --pq-subquantizers 16 --ef-search 16,64,256 --search-threads 2
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


def load_or_build_faiss(index_file: Path | None, rows: int, threads: int,
                        build: Callable[[], object]) -> object:
    """Load a faiss index from `index_file` if it exists, else build it and save it there.

    Builds use `threads` OpenMP threads, and the searches after it SEARCH_THREADS.
    """
    import faiss

    faiss.omp_set_num_threads(threads)
    if index_file is not None and index_file.exists():
        index = faiss.read_index(str(index_file))
        if index.ntotal != rows:
            raise SystemExit(f"{index_file} has {index.ntotal} rows, not {rows}")
    else:
        index = build()
        if index_file is not None:
            faiss.write_index(index, str(index_file))
    faiss.omp_set_num_threads(SEARCH_THREADS)
    return index


def faiss_search(index: object) -> Search:
    """Return a function that finds the nearest row of each query in a faiss index."""

    def search(queries: np.ndarray) -> np.ndarray:
        return index.search(queries, 1)[1].reshape(-1)  # type: ignore[attr-defined]

    return search


def build_faiss(vectors: np.ndarray, connectivity: int, ef_construction: int,
                threads: int, index_file: Path | None = None
                ) -> tuple[Search, Callable[[int], None]]:
    import faiss

    def build() -> object:
        index = faiss.IndexHNSWFlat(DIMENSION, connectivity, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(vectors)
        return index

    index = load_or_build_faiss(index_file, len(vectors), threads, build)

    def set_ef(ef: int) -> None:
        index.hnsw.efSearch = ef

    return faiss_search(index), set_ef


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

    return faiss_search(index), set_ef


def build_faiss_hnsw_sq(vectors: np.ndarray, connectivity: int, ef_construction: int,
                       threads: int, index_file: Path | None = None
                       ) -> tuple[Search, Callable[[int], None]]:
    """Build HNSW over scalar-quantized rows (--quantizer), reranked exactly by IndexRefineFlat.

    The graph walk reads 128 B (8-bit) or 256 B (fp16) per row instead of 512 B,
    and the refinement computes exact dot products for --refine-factor
    candidates per result. `ef` values are efSearch.
    """
    import faiss

    quantizer = {"sq8": faiss.ScalarQuantizer.QT_8bit,
                 "fp16": faiss.ScalarQuantizer.QT_fp16}[QUANTIZER]

    def build() -> object:
        base = faiss.IndexHNSWSQ(DIMENSION, quantizer, connectivity, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = ef_construction
        base.train(vectors[:min(len(vectors), 100_000)])
        index = faiss.IndexRefineFlat(base)
        index.add(vectors)
        return index

    index = load_or_build_faiss(index_file, len(vectors), threads, build)
    index.k_factor = REFINE_FACTOR
    hnsw = faiss.downcast_index(index.base_index).hnsw

    def set_ef(ef: int) -> None:
        hnsw.efSearch = ef

    return faiss_search(index), set_ef


def build_faiss_pq_fast_scan(vectors: np.ndarray, connectivity: int, ef_construction: int,
                             threads: int, index_file: Path | None = None
                             ) -> tuple[Search, Callable[[int], None]]:
    """Build a flat 4-bit product quantizer scanned with SIMD, reranked exactly.

    Every row is scanned (no graph), at --pq-subquantizers / 2 bytes per row.
    `ef` values are the refine factor: candidates reranked by exact dot product
    per result.
    """
    import faiss

    def build() -> object:
        base = faiss.IndexPQFastScan(DIMENSION, PQ_SUBQUANTIZERS, 4, faiss.METRIC_INNER_PRODUCT)
        base.train(vectors[:min(len(vectors), 100_000)])
        index = faiss.IndexRefineFlat(base)
        index.add(vectors)
        return index

    index = load_or_build_faiss(index_file, len(vectors), threads, build)

    def set_ef(ef: int) -> None:
        index.k_factor = ef

    return faiss_search(index), set_ef


def build_faiss_ivf_sq(vectors: np.ndarray, connectivity: int, ef_construction: int,
                       threads: int, index_file: Path | None = None
                       ) -> tuple[Search, Callable[[int], None]]:
    """Build IVF with 4 * sqrt(rows) lists, an HNSW coarse quantizer and 8-bit rows, reranked.

    `ef` values are nprobe (lists searched); --refine-factor candidates per result
    are reranked by exact dot product.
    """
    import faiss

    lists = max(1, int(4 * np.sqrt(len(vectors))))

    def build() -> object:
        coarse = faiss.IndexHNSWFlat(DIMENSION, connectivity, faiss.METRIC_INNER_PRODUCT)
        base = faiss.IndexIVFScalarQuantizer(coarse, DIMENSION, lists,
                                             faiss.ScalarQuantizer.QT_8bit,
                                             faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 40 * lists),
                                                 replace=False)
        base.train(vectors[sample])
        index = faiss.IndexRefineFlat(base)
        index.add(vectors)
        return index

    index = load_or_build_faiss(index_file, len(vectors), threads, build)
    index.k_factor = REFINE_FACTOR
    ivf = faiss.extract_index_ivf(index.base_index)
    faiss.downcast_index(ivf.quantizer).hnsw.efSearch = 128

    def set_ef(ef: int) -> None:
        ivf.nprobe = ef

    return faiss_search(index), set_ef


def build_agent_index(vectors: np.ndarray, connectivity: int, ef_construction: int,
                      threads: int, index_file: Path | None = None
                      ) -> tuple[Search, Callable[[int], None]]:
    """Build the index that the agent builds (agent/gallery_index.py); `ef` values are ignored."""
    import faiss

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agent.gallery_index import build_index

    index = build_index(np.asfortranarray(vectors), threads=threads)
    if index is None:
        raise SystemExit("agent.gallery_index.build_index returned no index")
    faiss.omp_set_num_threads(SEARCH_THREADS)

    def search(queries: np.ndarray) -> np.ndarray:
        return index.search(queries)[0]

    return search, lambda ef: None


BUILDERS = {"faiss": build_faiss, "usearch": build_usearch, "hnswlib": build_hnswlib,
            "faiss-ivf": build_faiss_ivf, "faiss-hnswsq": build_faiss_hnsw_sq,
            "faiss-pqfs": build_faiss_pq_fast_scan, "faiss-ivfsq": build_faiss_ivf_sq,
            "agent": build_agent_index}
FAISS_INDEX_FILES = {"faiss", "faiss-hnswsq", "faiss-pqfs", "faiss-ivfsq"}
# Options of the faiss variants, set from the command line in main().
QUANTIZER = "sq8"
REFINE_FACTOR = 4
PQ_SUBQUANTIZERS = 32
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
    parser.add_argument("--quantizer", choices=("sq8", "fp16"), default="sq8",
                        help="faiss-hnswsq: row encoding in the graph")
    parser.add_argument("--refine-factor", type=int, default=4,
                        help="faiss-hnswsq and faiss-ivfsq: candidates reranked exactly per "
                             "result")
    parser.add_argument("--pq-subquantizers", type=int, default=32,
                        help="faiss-pqfs: number of 4-bit subquantizers; must divide 128")
    parser.add_argument("--near-distance", type=float, default=0.7,
                        help="Euclidean distance of the near probes from their gallery row")
    parser.add_argument("--single-queries", type=int, default=200,
                        help="one-query searches timed for the single-query latency")
    args = parser.parse_args()
    global SEARCH_THREADS, QUANTIZER, REFINE_FACTOR, PQ_SUBQUANTIZERS
    SEARCH_THREADS = args.search_threads
    QUANTIZER = args.quantizer
    REFINE_FACTOR = args.refine_factor
    PQ_SUBQUANTIZERS = args.pq_subquantizers
    faiss_libraries = FAISS_INDEX_FILES & set(args.libraries.split(","))
    if args.index_file is not None and len(faiss_libraries) > 1:
        parser.error(f"--index-file holds one index, but {len(faiss_libraries)} faiss "
                     "libraries were requested; run them one at a time")

    print(f"# {machine_line()}")
    print(f"# {args.rows} rows x {DIMENSION}, M={args.connectivity}, "
          f"ef_construction={args.ef_construction}, {args.threads} threads to build, "
          f"{args.search_threads} to search, quantizer {args.quantizer}, refine factor "
          f"{args.refine_factor}, PQ subquantizers {args.pq_subquantizers}", flush=True)
    gallery = unit_rows(args.rows, DIMENSION, seed=1)
    near = probes_near(gallery, args.queries, distance=args.near_distance, seed=2)
    far = unit_rows(args.queries, DIMENSION, seed=3)
    truth_near = exact_nearest(gallery, near)
    truth_far = exact_nearest(gallery, far)
    batch = near[:BATCH]
    print(f"# near probes at distance {args.near_distance}, probes ready, RSS "
          f"{rss_mib():.0f} MiB", flush=True)

    for name in args.libraries.split(","):
        try:
            __import__("faiss" if name == "agent" else name.split("-")[0])
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
            # One probe per search, a different one each time, so no run reuses warm caches.
            single_probes = iter(np.tile(near, (args.single_queries // len(near) + 1, 1)))
            single_min, single_median = best_of(
                args.single_queries,
                lambda search=search, probes=single_probes: search(next(probes)[np.newaxis]))
            print(f"{name} ef={ef}: batch of {BATCH} min {query_min * 1e3:.2f} ms "
                  f"median {query_median * 1e3:.2f} ms, one query min "
                  f"{single_min * 1e3:.3f} median {single_median * 1e3:.3f} ms, recall@1 "
                  f"near {recall_near:.4f} random {recall_far:.4f}, load "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
        del search, set_ef


if __name__ == "__main__":
    main()
