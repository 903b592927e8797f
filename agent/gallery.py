"""The local gallery: enrolled identities and their embeddings, in one SQLite file.

Matching is exact and vectorised: for unit-length embeddings the Euclidean
distance is sqrt(2 - 2 * dot), so a batch of faces is matched against every
stored embedding with one matrix product.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


class GalleryError(RuntimeError):
    """The gallery file cannot be used with this model; the message gives the reason."""


@dataclass(frozen=True)
class Match:
    """Nearest enrolled identity for one face, or unknown when none is under the threshold."""

    identity_id: str | None
    name: str | None
    distance: float  # to the nearest stored embedding, in the configured metric; inf when empty

    @property
    def known(self) -> bool:
        return self.identity_id is not None


class Gallery:
    """SQLite-backed gallery for one model; cached in memory as a matrix for matching."""

    def __init__(self, path: Path, model_id: str, embedding_size: int) -> None:
        self.path = path
        self.model_id = model_id
        self.embedding_size = embedding_size
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._check_model()
        self._vectors = np.empty((0, embedding_size), dtype=np.float32)
        self._owners: list[str] = []
        self._names: dict[str, str] = {}
        self._reload()

    def close(self) -> None:
        self._db.close()

    @property
    def version(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        return int(row[0]) if row else 0

    @property
    def identity_count(self) -> int:
        return len(self._names)

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

        with self._transaction():
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
            version = self._bump_version()
        self._reload()
        log.info("gallery %s: stored %d embeddings for identity %s (%s), version %d",
                 self.path, len(vectors), identity_id, name, version)
        return version

    def match(self, embeddings: np.ndarray, threshold: float, metric: str) -> list[Match]:
        """Return the nearest identity for each row of `embeddings` (unit length)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        if len(embeddings) == 0:
            return []
        if len(self._vectors) == 0:
            return [Match(None, None, float("inf")) for _ in embeddings]

        # Rounding can push 2 - 2*dot a hair below zero for identical vectors.
        squared = np.maximum(2.0 - 2.0 * (embeddings @ self._vectors.T), 0.0)
        nearest = np.argmin(squared, axis=1)
        nearest_squared = squared[np.arange(len(embeddings)), nearest]
        distances = nearest_squared if metric == "squared_euclidean" else np.sqrt(nearest_squared)

        matches = []
        for index, distance in zip(nearest, distances, strict=True):
            if distance < threshold:
                owner = self._owners[index]
                matches.append(Match(owner, self._names[owner], float(distance)))
            else:
                matches.append(Match(None, None, float(distance)))
        return matches

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
        version = self.version + 1
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('version', ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(version),),
        )
        return version

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
        self._names = dict(self._db.execute("SELECT identity_id, name FROM identities"))
        rows = self._db.execute("SELECT identity_id, vector FROM embeddings ORDER BY id").fetchall()
        self._owners = [identity_id for identity_id, _ in rows]
        if rows:
            self._vectors = np.stack([np.frombuffer(blob, dtype="<f4") for _, blob in rows])
        else:
            self._vectors = np.empty((0, self.embedding_size), dtype=np.float32)

