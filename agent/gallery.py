"""The local gallery: enrolled identities and their embeddings, in one SQLite file.

Matching is exact and vectorised: for unit-length embeddings the Euclidean
distance is sqrt(2 - 2 * dot), so a batch of faces is matched against every
stored embedding with float32 matrix products (BLAS sgemm). There is one
product per block of EXACT_BLOCK_ROWS rows, spread over a few threads. The
matrix is kept column-major, because OpenBLAS multiplies by its C-contiguous
transpose about 1.6 times as fast as by the row-major one
(benchmarks/exact_match.py).

Above `approximate_min_rows` rows an approximate index (agent/gallery_index.py)
can serve matches instead. It is built in a background thread after each change,
and exact search serves until it is ready.

A gallery is either local, filled by `facenet-agent enroll`, or synced from one
server group by agent/gallery_sync.py, and never both: `add` rejects a synced
gallery and `apply_snapshot` rejects a local one that has identities. A synced
gallery's version is the server's version of that group.

Matching reads one immutable `_GalleryState`, replaced as a whole after each
committed change, so a match never reads half of an update and reports the
version of the rows it searched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from agent.gallery_index import INDEX_MODES, ApproximateIndex, build_index
from agent.gallery_protocol import IdentityChange

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    identity_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY,
    identity_id TEXT NOT NULL REFERENCES identities(identity_id) ON DELETE CASCADE,
    vector BLOB NOT NULL,   -- float32, little-endian, embedding_size values
    source TEXT NOT NULL    -- where the embedding came from, such as a photo path
);
CREATE INDEX IF NOT EXISTS embeddings_identity ON embeddings(identity_id);
"""

METRICS = ("euclidean", "squared_euclidean")
# Gallery rows per matrix product in exact search: 2 MiB of scores for a batch of
# 32 faces, which stays in L2.
EXACT_BLOCK_ROWS = 16_384
# Threads that share the blocks of one exact search. Each calls BLAS with one
# thread: OpenBLAS's own threads wait for each other at the end of every
# product, and a batch took up to 125 ms instead of 15 when another process
# held one of 2 cores. Free workers take the next block instead.
EXACT_WORKERS = min(os.cpu_count() or 1, 4)
_exact_pool: ThreadPoolExecutor | None = None
_blas_controller: object | None = None
_pool_lock = threading.Lock()


def _exact_workers() -> tuple[ThreadPoolExecutor, contextlib.AbstractContextManager[object]]:
    """Return the shared exact-search threads and a context that runs BLAS on one thread."""
    global _exact_pool, _blas_controller
    with _pool_lock:
        if _exact_pool is None:
            _exact_pool = ThreadPoolExecutor(EXACT_WORKERS, thread_name_prefix="gallery-match")
            try:
                from threadpoolctl import ThreadpoolController

                _blas_controller = ThreadpoolController()
            except ImportError:
                log.warning("threadpoolctl is not installed, so exact search cannot limit "
                            "BLAS to one thread per block; pip install threadpoolctl")
    if _blas_controller is None:
        return _exact_pool, contextlib.nullcontext()
    return _exact_pool, _blas_controller.limit(  # type: ignore[attr-defined]
        limits=1, user_api="blas")


class GalleryError(RuntimeError):
    """The gallery file cannot be used with this model; the message gives the reason."""


@dataclass(frozen=True)
class Match:
    """Nearest enrolled identity for one face, or unknown when none is under the threshold."""

    identity_id: str | None
    name: str | None
    distance: float  # to the nearest stored embedding, in the configured metric; inf when empty
    gallery_version: int = 0  # version of the gallery that was searched

    @property
    def known(self) -> bool:
        return self.identity_id is not None


@dataclass(frozen=True)
class _GalleryState:
    """Everything `match` reads, swapped as one object after each committed change."""

    version: int
    vectors: np.ndarray  # float32, one row per embedding, column-major (Fortran order)
    owners: list[str]  # identity id of each row
    names: dict[str, str]  # identity id -> name
    index: ApproximateIndex | None = None


class Gallery:
    """SQLite-backed gallery for one model; cached in memory as a matrix for matching."""

    def __init__(self, path: Path, model_id: str, embedding_size: int, *,
                 index_mode: str = "exact", approximate_min_rows: int = 100_000) -> None:
        """Open or create the gallery file; `index_mode` is exact, approximate or auto.

        "approximate" builds an approximate index whenever the gallery has rows,
        "auto" only from `approximate_min_rows` rows on.
        """
        if index_mode not in INDEX_MODES:
            raise ValueError(f"unknown index mode {index_mode!r}; expected one of {INDEX_MODES}")
        self.path = path
        self.model_id = model_id
        self.embedding_size = embedding_size
        self.index_mode = index_mode
        self.approximate_min_rows = approximate_min_rows
        # Serialises writes and state swaps; match() takes no lock.
        self._lock = threading.RLock()
        # Score buffer of each thread that runs exact search, reused across batches.
        self._scores = threading.local()
        # Index builds run one at a time in one thread, for the newest state.
        self._index_pending: _GalleryState | None = None
        self._index_building = False
        self._db = self._open(path)
        self._check_model()
        self._state = _GalleryState(0, np.empty((0, embedding_size), np.float32), [], {})
        self._reload()

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        try:
            if path.is_dir():
                raise GalleryError(f"gallery {path}: is a folder; set gallery.path to a file "
                                   "name such as /var/lib/facenet-agent/gallery.db")
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA foreign_keys=ON")
                db.executescript(SCHEMA)
            except BaseException:
                db.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            raise GalleryError(
                f"gallery {path}: cannot open it: {exc}. Check that gallery.path names an "
                "SQLite gallery file (or a new file) in a folder the agent can write to; "
                "move a damaged file aside and enrol again"
            ) from exc
        return db

    def close(self) -> None:
        self._db.close()

    @property
    def version(self) -> int:
        """Version of the rows that match() searches now."""
        return self._state.version

    @property
    def identity_count(self) -> int:
        return len(self._state.names)

    @property
    def embedding_count(self) -> int:
        return len(self._state.owners)

    @property
    def origin(self) -> str | None:
        """"local", "server:<group>", or None while the gallery has never changed."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        if row is not None:
            return str(row[0])
        return "local" if self._stored_version() > 0 else None

    @property
    def approximate_ready(self) -> bool:
        """True when match() uses the approximate index."""
        return self._state.index is not None

    def sources(self, identity_id: str) -> set[str]:
        """Return the distinct sources (such as photo paths) stored for an identity."""
        rows = self._db.execute(
            "SELECT DISTINCT source FROM embeddings WHERE identity_id = ?", (identity_id,)
        ).fetchall()
        return {str(row[0]) for row in rows}

    def add(self, identity_id: str, name: str, vectors: np.ndarray, sources: list[str]) -> int:
        """Store embeddings for one identity (created if new) and bump the gallery version."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_size:
            raise GalleryError(
                f"identity {identity_id}: expected embeddings of shape (n, {self.embedding_size}), "
                f"got {vectors.shape}"
            )
        if not np.all(np.isfinite(vectors)):
            raise GalleryError(f"identity {identity_id}: embeddings contain NaN or inf")

        with self._lock:
            self._add_rows(identity_id, name, vectors, sources)
            version = self.version
        log.info("gallery %s: stored %d embeddings for identity %s (%s), version %d",
                 self.path, len(vectors), identity_id, name, version)
        return version

    def _add_rows(self, identity_id: str, name: str, vectors: np.ndarray,
                  sources: list[str]) -> None:
        with self._transaction():
            origin = self.origin
            if origin is not None and origin != "local":
                raise GalleryError(
                    f"gallery {self.path} is synced from {origin}; enrol on the server with "
                    "`facenet-agent server enroll`, or use another gallery.path for local enrolment"
                )
            self._set_meta("origin", "local")
            self._db.execute(
                "INSERT INTO identities (identity_id, name, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(identity_id) DO UPDATE SET name = excluded.name",
                (identity_id, name, time.time()),
            )
            self._db.executemany(
                "INSERT INTO embeddings (identity_id, vector, source) VALUES (?, ?, ?)",
                [(identity_id, v.astype("<f4").tobytes(), s)
                 for v, s in zip(vectors, sources, strict=True)],
            )
            self._bump_version()
        self._reload()

    def match(self, embeddings: np.ndarray, threshold: float, metric: str) -> list[Match]:
        """Return the nearest identity for each row of `embeddings` (unit length)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        state = self._state
        if len(embeddings) == 0:
            return []
        if len(state.vectors) == 0:
            return [Match(None, None, float("inf"), state.version) for _ in embeddings]

        queries = np.asarray(embeddings, dtype=np.float32)
        if state.index is not None:
            nearest, best_dot = state.index.search(queries)
            missed = np.flatnonzero(nearest < 0)
            if len(missed):
                nearest[missed], best_dot[missed] = self._exact_nearest(state, queries[missed])
        else:
            nearest, best_dot = self._exact_nearest(state, queries)
        # Rounding can push 2 - 2*dot a hair below zero for identical vectors.
        nearest_squared = np.maximum(2.0 - 2.0 * best_dot, 0.0)
        distances = nearest_squared if metric == "squared_euclidean" else np.sqrt(nearest_squared)

        matches = []
        for row, distance in zip(nearest, distances, strict=True):
            if distance < threshold:
                owner = state.owners[row]
                matches.append(Match(owner, state.names[owner], float(distance), state.version))
            else:
                matches.append(Match(None, None, float(distance), state.version))
        return matches

    def _exact_nearest(self, state: _GalleryState,
                       queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (nearest row, its dot product) for each query, by matrix products.

        The gallery is multiplied in blocks of EXACT_BLOCK_ROWS rows, on the
        shared worker threads when there is more than one block. The largest
        dot product is the smallest distance, so only the best row per face
        leaves each block.
        """
        columns = state.vectors.T  # C-contiguous, because the matrix is column-major
        starts = range(0, columns.shape[1], EXACT_BLOCK_ROWS)
        if len(starts) == 1:
            results = [self._nearest_in_block(columns, queries, 0)]
        else:
            pool, one_blas_thread = _exact_workers()
            # NOTE: the BLAS limit is process-wide while it lasts, so a large numpy
            # product in another thread runs on one core during the search.
            with one_blas_thread:
                results = list(pool.map(
                    lambda start: self._nearest_in_block(columns, queries, start), starts))

        nearest = np.zeros(len(queries), dtype=np.int64)
        best_dot = np.full(len(queries), -np.inf, dtype=np.float32)
        for block_nearest, block_best in results:
            better = block_best > best_dot
            nearest[better] = block_nearest[better]
            best_dot[better] = block_best[better]
        return nearest, best_dot

    def _nearest_in_block(self, columns: np.ndarray, queries: np.ndarray,
                          start: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (gallery row, dot product) of each query's best row in one block."""
        block = columns[:, start:start + EXACT_BLOCK_ROWS]
        buffer: np.ndarray | None = getattr(self._scores, "buffer", None)
        if buffer is None or buffer.shape[0] < len(queries):
            buffer = np.empty((len(queries), EXACT_BLOCK_ROWS), np.float32)
            self._scores.buffer = buffer
        dots = np.matmul(queries, block, out=buffer[:len(queries), :block.shape[1]])
        best = np.argmax(dots, axis=1)
        return best + start, dots[np.arange(len(queries)), best]

    def apply_snapshot(self, group: str, version: int, changes: Sequence[IdentityChange],
                       vectors: np.ndarray) -> None:
        """Replace every identity with a server snapshot, in one transaction.

        Raises GalleryError, leaving the gallery as it was, when the gallery holds
        local enrolments, belongs to another group, or is already at `version` or newer.
        """
        rows = self._check_rows(vectors, f"snapshot {version}")
        with self._lock:
            with self._transaction():
                self._replace_all(group, version, changes, rows)
            empty = _GalleryState(0, np.empty((0, self.embedding_size), np.float32, order="F"),
                                  [], {})
            self._replace_state(self._state_after(empty, version, changes, rows))

    def _replace_all(self, group: str, version: int, changes: Sequence[IdentityChange],
                     rows: np.ndarray) -> None:
        self._check_sync_target(group, version)
        self._db.execute("DELETE FROM embeddings")
        self._db.execute("DELETE FROM identities")
        self._insert_changes(changes, rows, f"server:{group}@{version}")
        self._set_meta("origin", f"server:{group}")
        self._set_meta("version", str(version))

    def apply_delta(self, group: str, base_version: int, version: int,
                    changes: Sequence[IdentityChange], vectors: np.ndarray) -> None:
        """Apply one server delta in one transaction, or raise GalleryError and change nothing.

        The gallery must be at `base_version`. `add` needs an absent identity and
        `update` and `remove` a present one; any other state means the gallery
        differs from the server's, and the caller should fetch a snapshot.
        """
        rows = self._check_rows(vectors, f"delta {version}")
        with self._lock:
            with self._transaction():
                self._apply_changes(group, base_version, version, changes, rows)
            self._replace_state(self._state_after(self._state, version, changes, rows))

    @staticmethod
    def _state_after(state: _GalleryState, version: int, changes: Sequence[IdentityChange],
                     rows: np.ndarray) -> _GalleryState:
        """Return the state after a committed snapshot or delta, without reading the file.

        The rows come out in the order that `_reload` reads them: the kept rows,
        then the new ones in insertion order. Reading 100k rows back from SQLite
        took over a second on the benchmark machine.
        """
        # Only identities that have rows now lose them; a delta of new identities
        # keeps every row and skips the per-row scan.
        replaced = {change.identity_id for change in changes} & state.names.keys()
        upserts = [change for change in changes if change.op != "remove"]
        starts = np.fromiter((c.first_row for c in upserts), dtype=np.int64, count=len(upserts))
        counts = np.fromiter((c.row_count for c in upserts), dtype=np.int64, count=len(upserts))
        total = int(counts.sum())
        # Row i of the new rows is rows[i + starts[k] - (rows before change k)].
        shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)

        if replaced:
            keep = np.fromiter((owner not in replaced for owner in state.owners), dtype=bool,
                               count=len(state.owners))
            kept = int(keep.sum())
            owners = [owner for owner, kept_row in zip(state.owners, keep, strict=True)
                      if kept_row]
        else:
            kept = len(state.owners)
            owners = list(state.owners)
        vectors = np.empty((kept + total, state.vectors.shape[1]), dtype=np.float32, order="F")
        if replaced:
            # Along the C-contiguous transpose: 6 times faster than a row mask on the
            # column-major matrix at 100k rows.
            np.compress(keep, state.vectors.T, axis=1, out=vectors.T[:, :kept])
        else:
            vectors[:kept] = state.vectors
        vectors[kept:] = rows[:total] if not shift.any() else rows[np.arange(total) + shift]
        owners += [c.identity_id for c in upserts for _ in range(c.row_count)]

        names = dict(state.names)
        for identity_id in replaced:
            del names[identity_id]
        names.update((c.identity_id, c.name) for c in upserts)
        return _GalleryState(version, vectors, owners, names)

    def _apply_changes(self, group: str, base_version: int, version: int,
                       changes: Sequence[IdentityChange], rows: np.ndarray) -> None:
        self._check_sync_target(group, version)
        current = self._stored_version()
        if current != base_version:
            raise GalleryError(
                f"delta {version} applies to version {base_version}, gallery is at {current}"
            )
        for change in changes:
            exists = self._db.execute("SELECT 1 FROM identities WHERE identity_id = ?",
                                      (change.identity_id,)).fetchone() is not None
            if exists == (change.op == "add"):
                raise GalleryError(
                    f"delta {version}: cannot {change.op} identity "
                    f"{change.identity_id[:80]!r}, which is "
                    f"{'already' if exists else 'not'} in gallery version {current}"
                )
            self._db.execute("DELETE FROM embeddings WHERE identity_id = ?",
                             (change.identity_id,))
            self._db.execute("DELETE FROM identities WHERE identity_id = ?",
                             (change.identity_id,))
        upserts = [change for change in changes if change.op != "remove"]
        self._insert_changes(upserts, rows, f"server:{group}@{version}")
        self._set_meta("version", str(version))

    def _check_rows(self, vectors: np.ndarray, what: str) -> np.ndarray:
        rows = np.asarray(vectors, dtype="<f4")
        if rows.ndim != 2 or rows.shape[1] != self.embedding_size:
            raise GalleryError(f"{what}: expected embeddings of shape (n, "
                               f"{self.embedding_size}), got {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise GalleryError(f"{what}: embeddings contain NaN or inf")
        return rows

    def _check_sync_target(self, group: str, version: int) -> None:
        origin = self.origin
        if origin == "local":
            raise GalleryError(
                f"gallery {self.path} contains local enrolments; a synced gallery needs its own "
                "file, so set gallery.path to a new file or enrol these people on the server"
            )
        if origin is not None and origin != f"server:{group}":
            raise GalleryError(f"gallery {self.path} is synced from {origin}, not server:{group}")
        current = self._stored_version()
        if version <= current:
            raise GalleryError(f"version {version} is not newer than the gallery's {current}")

    def _insert_changes(self, changes: Sequence[IdentityChange], rows: np.ndarray,
                        source: str) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT INTO identities (identity_id, name, created_at) VALUES (?, ?, ?)",
            [(change.identity_id, change.name, now) for change in changes],
        )
        self._db.executemany(
            "INSERT INTO embeddings (identity_id, vector, source) VALUES (?, ?, ?)",
            [
                (change.identity_id, rows[row].tobytes(), source)
                for change in changes
                for row in range(change.first_row, change.first_row + change.row_count)
            ],
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one SQLite transaction: commit on success, roll back on error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _bump_version(self) -> int:
        version = self._stored_version() + 1
        self._set_meta("version", str(version))
        return version

    def _stored_version(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        return int(row[0]) if row else 0

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _check_model(self) -> None:
        rows = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        stored_model = rows.get("model_id")
        if stored_model is None:
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("model_id", self.model_id), ("embedding_size", str(self.embedding_size))],
            )
            return
        if stored_model != self.model_id or rows.get("embedding_size") != str(self.embedding_size):
            raise GalleryError(
                f"gallery {self.path} contains embeddings of model {stored_model} "
                f"({rows.get('embedding_size')}-d) but the agent runs {self.model_id} "
                f"({self.embedding_size}-d); re-enrol into a new gallery file"
            )

    def _reload(self) -> None:
        names = dict(self._db.execute("SELECT identity_id, name FROM identities"))
        rows = self._db.execute("SELECT identity_id, vector FROM embeddings ORDER BY id").fetchall()
        owners = [identity_id for identity_id, _ in rows]
        blob = b"".join(vector for _, vector in rows)
        del rows
        vectors = np.array(np.frombuffer(blob, dtype="<f4").reshape(-1, self.embedding_size),
                           dtype=np.float32, order="F")
        del blob
        self._replace_state(_GalleryState(self._stored_version(), vectors, owners, names))

    def _replace_state(self, state: _GalleryState) -> None:
        self._state = state
        if self._wants_index(len(state.vectors)):
            self._request_index(state)

    def _request_index(self, state: _GalleryState) -> None:
        # Every change rebuilds the whole index, and exact search serves until it
        # is ready: 2.8 s at 1M rows on 2 free cores, up to 22 s on busy ones
        # (docs/benchmarks.md).
        with self._lock:
            self._index_pending = state
            if self._index_building:
                return  # the running builder takes this state next
            self._index_building = True
        threading.Thread(target=self._build_indexes, name="gallery-index", daemon=True).start()

    def _build_indexes(self) -> None:
        """Build an index for the newest requested state, until no request is pending."""
        while True:
            with self._lock:
                state, self._index_pending = self._index_pending, None
                if state is None:
                    self._index_building = False
                    return
            if state is self._state:
                self._build_index(state)

    def _wants_index(self, rows: int) -> bool:
        if self.index_mode == "approximate":
            return rows > 0
        return self.index_mode == "auto" and rows >= self.approximate_min_rows

    def _build_index(self, state: _GalleryState) -> None:
        try:
            index = build_index(state.vectors, cancelled=lambda: self._state is not state)
        except Exception:
            log.exception("gallery %s version %d: building the approximate index failed; "
                          "exact search stays in use", self.path, state.version)
            return
        with self._lock:
            if self._state is not state:
                log.info("gallery %s: index for version %d discarded, the gallery changed",
                         self.path, state.version)
                return
            if index is not None:
                self._state = replace(state, index=index)
                log.info("gallery %s version %d: approximate index ready over %d rows",
                         self.path, state.version, len(state.vectors))

