"""Time exact matching of a batch of 32 faces against a 100k x 128 float32 gallery.

One batch is 32 x 100,000 x 128 = 410M multiply-adds, 0.82 GFLOP. The script
first measures this machine's float32 sgemm peak on a 2048^3 product, which
bounds the batch from below, then times the variants of one matrix product plus
a row-wise argmax, and last the agent's own `Gallery.match`. Each variant runs
with OpenBLAS on 1 and on 2 threads, in a child process per thread count,
because OpenBLAS reads OPENBLAS_NUM_THREADS only at import. With --busy-core a
process spins on one core meanwhile, as inference would on a device. Usage:

    python benchmarks/exact_match.py [--rows 100000] [--repeats 50] [--busy-core]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine_line, probes_near, unit_rows  # noqa: E402

DIMENSION = 128
BATCH = 32
PEAK_SIZE = 2048
BLOCK_COLUMNS = 16_384


def sgemm_peak_gflops() -> float:
    rng = np.random.default_rng(0)
    left = rng.standard_normal((PEAK_SIZE, PEAK_SIZE), dtype=np.float32)
    right = rng.standard_normal((PEAK_SIZE, PEAK_SIZE), dtype=np.float32)
    out = np.empty_like(left)
    fastest, _ = best_of(10, lambda: np.matmul(left, right, out=out))
    return 2 * PEAK_SIZE**3 / fastest / 1e9


def variants(gallery: np.ndarray, batch: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """Return the exact nearest-row functions to time, by name; each returns row indexes."""
    rows = len(gallery)
    columns = np.asfortranarray(gallery)  # the agent's layout: gallery.T is C-contiguous
    scores = np.empty((BATCH, rows), np.float32)
    block = np.empty((BATCH, BLOCK_COLUMNS), np.float32)
    pool = ThreadPoolExecutor(2)
    halves = [(0, rows // 2), (rows // 2, rows)]
    half_scores = [scores[:, start:end] for start, end in halves]

    def blocked() -> np.ndarray:
        best_rows = np.zeros(BATCH, np.int64)
        best_dots = np.full(BATCH, -np.inf, np.float32)
        for start in range(0, rows, BLOCK_COLUMNS):
            end = min(start + BLOCK_COLUMNS, rows)
            part = block[:, :end - start]
            np.matmul(batch, columns.T[:, start:end], out=part)
            nearest = part.argmax(axis=1)
            dots = part[np.arange(BATCH), nearest]
            better = dots > best_dots
            best_dots[better] = dots[better]
            best_rows[better] = nearest[better] + start
        return best_rows

    def two_threads() -> np.ndarray:
        def half(index: int) -> None:
            start, end = halves[index]
            np.matmul(batch, columns.T[:, start:end], out=half_scores[index])

        list(pool.map(half, range(2)))
        return scores.argmax(axis=1)

    return {
        "row-major, new output, argmax": lambda: np.argmax(batch @ gallery.T, axis=1),
        "row-major, preallocated output": lambda: np.matmul(batch, gallery.T,
                                                            out=scores).argmax(axis=1),
        "column-major, new output": lambda: np.argmax(batch @ columns.T, axis=1),
        "column-major, preallocated output": lambda: np.matmul(batch, columns.T,
                                                               out=scores).argmax(axis=1),
        "column-major, argpartition": lambda: np.argpartition(
            -np.matmul(batch, columns.T, out=scores), 0, axis=1)[:, 0],
        f"column-major, blocks of {BLOCK_COLUMNS} columns": blocked,
        "column-major, 2 Python threads on halves": two_threads,
    }


def time_gallery_match(gallery: np.ndarray, batch: np.ndarray,
                       repeats: int) -> tuple[float, float]:
    """Return the (min, median) seconds of `Gallery.match` of the batch, with exact search."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from agent.gallery import Gallery
    from agent.gallery_protocol import IdentityChange

    with tempfile.TemporaryDirectory() as folder:
        store = Gallery(Path(folder) / "gallery.db", "bench-model", DIMENSION, index_mode="exact")
        changes = [IdentityChange(f"id-{i}", "N", "add", i, 1) for i in range(len(gallery))]
        store.apply_snapshot("bench", 1, changes, gallery)
        store.match(batch, threshold=1.1, metric="euclidean")
        timings = best_of(repeats, lambda: store.match(batch, 1.1, "euclidean"))
        store.close()
    return timings


def run_child(rows: int, repeats: int) -> None:
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "?")
    peak = sgemm_peak_gflops()
    flop = 2 * BATCH * rows * DIMENSION
    print(f"## OpenBLAS threads {threads}: sgemm peak {peak:.0f} GFLOP/s on {PEAK_SIZE}^3, so "
          f"one batch needs at least {flop / peak / 1e6:.1f} ms; load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    gallery = unit_rows(rows, DIMENSION, seed=1)
    batch = probes_near(gallery, BATCH, distance=0.7, seed=2)
    truth = np.argmax(batch @ gallery.T, axis=1)
    for name, nearest in variants(gallery, batch).items():
        if not np.array_equal(nearest(), truth):
            raise SystemExit(f"{name}: returned other rows than the reference")
        fastest, median = best_of(repeats, nearest)
        print(f"{name}: min {fastest * 1e3:.2f} ms, median {median * 1e3:.2f} ms, "
              f"{flop / fastest / 1e9:.0f} GFLOP/s at min", flush=True)
    fastest, median = time_gallery_match(gallery, batch, repeats)
    print(f"Gallery.match (agent, exact): min {fastest * 1e3:.2f} ms, median "
          f"{median * 1e3:.2f} ms; load {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", default="1,2", help="OpenBLAS thread counts to try")
    parser.add_argument("--busy-core", action="store_true",
                        help="keep one core busy with a spinning process during the runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.rows, args.repeats)
        return

    print(f"# {machine_line()}")
    print(f"# batch {BATCH} x {args.rows} rows x {DIMENSION}: "
          f"{2 * BATCH * args.rows * DIMENSION / 1e9:.2f} GFLOP"
          f"{', one core kept busy' if args.busy_core else ''}", flush=True)
    spinner = None
    if args.busy_core:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for threads in args.threads.split(","):
            environment = {**os.environ, "OPENBLAS_NUM_THREADS": threads}
            subprocess.run([sys.executable, __file__, "--child", "--rows", str(args.rows),
                            "--repeats", str(args.repeats)], env=environment, check=True)
    finally:
        if spinner is not None:
            spinner.kill()


if __name__ == "__main__":
    main()
