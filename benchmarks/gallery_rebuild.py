"""Time the gallery's approximate index rebuild after a delta, in one process.

A real SQLite gallery in auto index mode receives a snapshot of --rows random
128-d identities (one row each), then a delta that adds --delta-identities
more. The script reports how long the delta took to apply, how long until the
index for the new version served matches, and how long the batches of 32 that
exact search served in the meantime took. No broker and no models are needed
(benchmarks/gallery_sync.py covers the MQTT path). Usage:

    python benchmarks/gallery_rebuild.py --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import best_of, machine_line, probes_near, unit_rows  # noqa: E402

from agent.gallery import Gallery  # noqa: E402
from agent.gallery_protocol import IdentityChange  # noqa: E402

DIMENSION = 128
BATCH = 32


def wait_for_index(gallery: Gallery, version: int, timeout_s: float) -> None:
    """Wait until the gallery serves `version` through its approximate index."""
    deadline = time.monotonic() + timeout_s
    while not (gallery.version == version and gallery.approximate_ready):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s waiting for the approximate index "
                             f"of version {version}; raise --timeout")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="identities in the snapshot")
    parser.add_argument("--delta-identities", type=int, default=100,
                        help="identities that the delta adds")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for each index build")
    args = parser.parse_args()

    print(f"# {machine_line()}", flush=True)
    rows = unit_rows(args.rows + args.delta_identities, DIMENSION, seed=1)
    probes = probes_near(rows[:args.rows], BATCH, distance=0.7, seed=2)
    with tempfile.TemporaryDirectory() as folder:
        gallery = Gallery(Path(folder) / "gallery.db", "bench-model", DIMENSION,
                          index_mode="auto", approximate_min_rows=min(args.rows, 100_000))
        started = time.perf_counter()
        snapshot = [IdentityChange(f"id-{i}", f"Name {i}", "add", i, 1) for i in range(args.rows)]
        gallery.apply_snapshot("lobby", 1, snapshot, rows[:args.rows])
        print(f"snapshot of {args.rows} rows applied in {time.perf_counter() - started:.1f} s",
              flush=True)
        started = time.perf_counter()
        wait_for_index(gallery, 1, args.timeout)
        print(f"index ready {time.perf_counter() - started:.2f} s after the snapshot", flush=True)
        fastest, median = best_of(20, lambda: gallery.match(probes, 1.1, "euclidean"))
        print(f"batch of {BATCH} through the index: min {fastest * 1e3:.1f} ms, median "
              f"{median * 1e3:.1f} ms", flush=True)

        delta = [IdentityChange(f"new-{i}", "New", "add", i, 1)
                 for i in range(args.delta_identities)]
        started = time.perf_counter()
        gallery.apply_delta("lobby", 1, 2, delta, rows[args.rows:])
        applied = time.perf_counter() - started
        exact_times = []
        while not gallery.approximate_ready:
            match_started = time.perf_counter()
            gallery.match(probes, 1.1, "euclidean")
            exact_times.append(time.perf_counter() - match_started)
        wait_for_index(gallery, 2, args.timeout)
        ready = time.perf_counter() - started
        exact_median = f"{np.median(exact_times) * 1e3:.0f} ms" if exact_times else "none"
        print(f"delta of {args.delta_identities} identities applied in {applied * 1e3:.0f} ms; "
              f"index for version 2 ready {ready:.2f} s after the delta started; exact search "
              f"served {len(exact_times)} batches meanwhile, median {exact_median}", flush=True)

        added = rows[args.rows:args.rows + BATCH]
        found = gallery.match(added, 0.1, "euclidean")
        hits = sum(1 for match in found if (match.identity_id or "").startswith("new-"))
        print(f"added rows found through the new index: {hits} of {len(added)}, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        gallery.close()


if __name__ == "__main__":
    main()
