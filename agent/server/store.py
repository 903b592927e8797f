"""The server's store: identities per group, what was published, and sightings.

`open_store` returns a SQLite store (the default, one file) or a PostgreSQL
store (for fleets whose collectors write from several processes or hosts).
Both implement `ServerStore` with the same SQL. Only the placeholders, the
binary column type and the transaction calls differ.

A store object wraps one connection and is not thread-safe: give each thread
its own, from `open_store`.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import StoreConfig

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS server_groups (
    group_id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    embedding_size INTEGER NOT NULL,
    metric TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 0,      -- last published version, 0 before the first
    manifest {blob}                         -- signed manifest message of that version
);
CREATE TABLE IF NOT EXISTS server_identities (
    group_id TEXT NOT NULL REFERENCES server_groups(group_id),
    identity_id TEXT NOT NULL,
    name TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    digest TEXT,                            -- StoredIdentity.digest, NULL in older stores
    PRIMARY KEY (group_id, identity_id)
);
CREATE TABLE IF NOT EXISTS server_embeddings (
    id {serial},
    group_id TEXT NOT NULL,
    identity_id TEXT NOT NULL,
    vector {blob} NOT NULL,                 -- float32 little-endian
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS server_embeddings_identity
    ON server_embeddings(group_id, identity_id);
CREATE TABLE IF NOT EXISTS published_identities (
    group_id TEXT NOT NULL,
    identity_id TEXT NOT NULL,
    digest TEXT NOT NULL,                   -- sha256 of name and vectors as published
    PRIMARY KEY (group_id, identity_id)
);
CREATE TABLE IF NOT EXISTS published_objects (
    group_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    version BIGINT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (group_id, kind, version)
);
CREATE TABLE IF NOT EXISTS sightings (
    event_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    identity_id TEXT,
    name TEXT,
    distance DOUBLE PRECISION,
    gallery_version BIGINT,
    model_id TEXT,
    capture_time TEXT,
    received_at DOUBLE PRECISION NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sightings_identity ON sightings(identity_id, capture_time);
"""


class StoreError(RuntimeError):
    """A store operation that would break the store's rules; the message names the rule."""


@dataclass(frozen=True)
class GroupInfo:
    group: str
    model_id: str
    embedding_size: int
    metric: str
    version: int
    manifest: bytes | None


@dataclass(frozen=True)
class StoredIdentity:
    identity_id: str
    name: str
    vectors: np.ndarray  # float32, one row per embedding, in insertion order

    @property
    def digest(self) -> str:
        digest = hashlib.sha256(self.name.encode("utf-8") + b"\0")
        digest.update(np.ascontiguousarray(self.vectors, dtype="<f4").tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Sighting:
    event_id: str
    device_id: str
    identity_id: str | None
    name: str | None
    distance: float | None
    gallery_version: int | None
    model_id: str | None
    capture_time: str | None
    payload: str


# Identity ids per `IN (...)` query: with the group id, below the 999 parameters per
# statement that SQLite allowed before version 3.32.
IDS_PER_QUERY = 500


class ServerStore(abc.ABC):
    """Identities, published versions and sightings; see the module docstring."""

    placeholder = "?"
    description = ""

    @abc.abstractmethod
    def _transaction(self) -> Any: ...

    @abc.abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    @abc.abstractmethod
    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def _columns(self, table: str) -> set[str]: ...

    def _add_missing_columns(self) -> None:
        """Add the columns that stores created by earlier versions lack."""
        if "digest" not in self._columns("server_identities"):
            self._execute("ALTER TABLE server_identities ADD COLUMN digest TEXT")

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self._execute(sql, params).fetchall())

    # Groups and identities

    def ensure_group(self, group: str, model_id: str, embedding_size: int, metric: str) -> None:
        """Create the group, or check that it exists for the same model."""
        with self._transaction():
            rows = self._query(
                "SELECT model_id, embedding_size, metric FROM server_groups WHERE group_id = ?",
                (group,))
            if not rows:
                self._execute("INSERT INTO server_groups (group_id, model_id, embedding_size, "
                              "metric) VALUES (?, ?, ?, ?)",
                              (group, model_id, embedding_size, metric))
                log.info("store %s: created group %s for model %s (%d-d, %s)",
                         self.description, group, model_id, embedding_size, metric)
                return
        stored = (rows[0][0], int(rows[0][1]), rows[0][2])
        if stored != (model_id, embedding_size, metric):
            raise StoreError(
                f"group {group} uses model {stored[0]} ({stored[1]}-d, {stored[2]}), not "
                f"{model_id} ({embedding_size}-d, {metric}); use another group for that model"
            )

    def group_info(self, group: str) -> GroupInfo:
        rows = self._query("SELECT model_id, embedding_size, metric, version, manifest "
                           "FROM server_groups WHERE group_id = ?", (group,))
        if not rows:
            raise StoreError(f"group {group} not found; enrol or import into it first")
        model_id, size, metric, version, manifest = rows[0]
        return GroupInfo(group, model_id, int(size), metric, int(version),
                         bytes(manifest) if manifest is not None else None)

    def groups(self) -> list[str]:
        return [row[0] for row in self._query("SELECT group_id FROM server_groups "
                                              "ORDER BY group_id")]

    def put_identity(self, group: str, identity_id: str, name: str, vectors: np.ndarray,
                     sources: Sequence[str]) -> None:
        """Create or replace an identity with these embeddings; publish to send it."""
        info = self.group_info(group)
        rows = np.asarray(vectors, dtype="<f4")
        if rows.ndim != 2 or rows.shape[1] != info.embedding_size or len(rows) == 0:
            raise StoreError(f"identity {identity_id}: expected embeddings of shape "
                             f"(n >= 1, {info.embedding_size}), got {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise StoreError(f"identity {identity_id}: embeddings contain NaN or inf")
        if len(sources) != len(rows):
            raise StoreError(f"identity {identity_id}: {len(rows)} embeddings but "
                             f"{len(sources)} sources")
        digest = StoredIdentity(identity_id, name, rows).digest
        with self._transaction():
            self._execute("DELETE FROM server_embeddings WHERE group_id = ? AND identity_id = ?",
                          (group, identity_id))
            self._execute(
                "INSERT INTO server_identities (group_id, identity_id, name, updated_at, digest) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id, identity_id) DO UPDATE SET "
                "name = excluded.name, updated_at = excluded.updated_at, digest = excluded.digest",
                (group, identity_id, name, time.time(), digest))
            self._executemany(
                "INSERT INTO server_embeddings (group_id, identity_id, vector, source) "
                "VALUES (?, ?, ?, ?)",
                [(group, identity_id, row.tobytes(), source)
                 for row, source in zip(rows, sources, strict=True)])

    def put_identities(self, group: str,
                       identities: Iterable[tuple[str, str, np.ndarray, Sequence[str]]]) -> int:
        """Store many identities; each replaces any earlier one with its id. Returns the count."""
        count = 0
        with self._transaction():
            for identity_id, name, vectors, sources in identities:
                self.put_identity(group, identity_id, name, vectors, sources)
                count += 1
        return count

    def remove_identity(self, group: str, identity_id: str) -> bool:
        """Delete an identity; return False when the group has none with that id."""
        with self._transaction():
            self._execute("DELETE FROM server_embeddings WHERE group_id = ? AND identity_id = ?",
                          (group, identity_id))
            cursor = self._execute(
                "DELETE FROM server_identities WHERE group_id = ? AND identity_id = ?",
                (group, identity_id))
            return bool(cursor.rowcount)

    def identities(self, group: str,
                   identity_ids: Sequence[str] | None = None) -> list[StoredIdentity]:
        """Return the group's identities, or those of `identity_ids`, sorted by id."""
        info = self.group_info(group)
        if identity_ids is None:
            names = dict(self._query(
                "SELECT identity_id, name FROM server_identities WHERE group_id = ?", (group,)))
            rows = self._execute("SELECT identity_id, vector FROM server_embeddings "
                                 "WHERE group_id = ? ORDER BY id", (group,))
        else:
            names, rows = self._some_identities(group, identity_ids)
        vectors: dict[str, list[bytes]] = {identity_id: [] for identity_id in names}
        for identity_id, blob in rows:
            vectors[identity_id].append(bytes(blob))
        return [
            StoredIdentity(identity_id, names[identity_id], np.frombuffer(
                b"".join(vectors[identity_id]), dtype="<f4").reshape(-1, info.embedding_size))
            for identity_id in sorted(names)
        ]

    def _some_identities(self, group: str, identity_ids: Sequence[str]
                         ) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
        """Return names and (identity id, vector) rows of the listed identities that exist."""
        names: dict[str, str] = {}
        rows: list[tuple[str, bytes]] = []
        for start in range(0, len(identity_ids), IDS_PER_QUERY):
            part = list(identity_ids[start:start + IDS_PER_QUERY])
            marks = ", ".join("?" * len(part))
            names.update(self._query(
                f"SELECT identity_id, name FROM server_identities WHERE group_id = ? "
                f"AND identity_id IN ({marks})", (group, *part)))
            rows += self._query(
                f"SELECT identity_id, vector FROM server_embeddings WHERE group_id = ? "
                f"AND identity_id IN ({marks}) ORDER BY id", (group, *part))
        return names, rows

    def unpublished_changes(self, group: str) -> tuple[dict[str, bool], list[str]]:
        """Compare the identities with the published digests, inside the database.

        Returns the identities whose digest differs from the published one, each
        mapped to whether it was published before, and the published identities
        that no longer exist, sorted.
        """
        self._fill_missing_digests(group)
        changed = {identity_id: published is not None for identity_id, published in self._query(
            "SELECT i.identity_id, p.digest FROM server_identities i "
            "LEFT JOIN published_identities p "
            "ON p.group_id = i.group_id AND p.identity_id = i.identity_id "
            "WHERE i.group_id = ? AND (p.digest IS NULL OR p.digest <> i.digest)", (group,))}
        removed = [str(row[0]) for row in self._query(
            "SELECT p.identity_id FROM published_identities p "
            "LEFT JOIN server_identities i "
            "ON i.group_id = p.group_id AND i.identity_id = p.identity_id "
            "WHERE p.group_id = ? AND i.identity_id IS NULL ORDER BY p.identity_id", (group,))]
        return changed, removed

    def _fill_missing_digests(self, group: str) -> None:
        """Compute the digests of identities written before the digest column existed."""
        missing = [str(row[0]) for row in self._query(
            "SELECT identity_id FROM server_identities WHERE group_id = ? AND digest IS NULL",
            (group,))]
        if not missing:
            return
        with self._transaction():
            self._executemany(
                "UPDATE server_identities SET digest = ? WHERE group_id = ? AND identity_id = ?",
                [(i.digest, group, i.identity_id) for i in self.identities(group, missing)])
        log.info("store %s: computed the digests of %d identities of group %s",
                 self.description, len(missing), group)

    # Publications

    def published_digests(self, group: str) -> dict[str, str]:
        return dict(self._query(
            "SELECT identity_id, digest FROM published_identities WHERE group_id = ?", (group,)))

    def published_objects(self, group: str) -> dict[tuple[str, int], bytes]:
        return {(kind, int(version)): bytes(data) for kind, version, data in self._query(
            "SELECT kind, version, data FROM published_objects WHERE group_id = ?", (group,))}

    def commit_publication(self, group: str, version: int, manifest: bytes,
                           digest_changes: dict[str, str | None],
                           new_objects: dict[tuple[str, int], bytes],
                           keep: set[tuple[str, int]]) -> None:
        """Record a published version in one transaction.

        Raises StoreError when another publisher has committed `version` first.
        `digest_changes` maps each identity that the version adds or updates to its
        published digest, and each one it removes to None. Objects not in `keep`
        are deleted.
        """
        with self._transaction():
            cursor = self._execute(
                "UPDATE server_groups SET version = ?, manifest = ? WHERE group_id = ? "
                "AND version = ?", (version, manifest, group, version - 1))
            same_version = False
            if not cursor.rowcount:
                # A republication of the current version with a new layout.
                cursor = self._execute(
                    "UPDATE server_groups SET manifest = ? WHERE group_id = ? AND version = ?",
                    (manifest, group, version))
                same_version = bool(cursor.rowcount)
                if not same_version:
                    raise StoreError(f"group {group}: version {version} cannot follow the stored "
                                     "version; another publisher got there first")
            self._executemany(
                "DELETE FROM published_identities WHERE group_id = ? AND identity_id = ?",
                [(group, i) for i, d in sorted(digest_changes.items()) if d is None])
            self._executemany(
                "INSERT INTO published_identities (group_id, identity_id, digest) "
                "VALUES (?, ?, ?) ON CONFLICT (group_id, identity_id) DO UPDATE SET "
                "digest = excluded.digest",
                [(group, i, d) for i, d in sorted(digest_changes.items()) if d is not None])
            for (kind, object_version), data in new_objects.items():
                self._execute("DELETE FROM published_objects WHERE group_id = ? AND kind = ? "
                              "AND version = ?", (group, kind, object_version))
                self._execute("INSERT INTO published_objects (group_id, kind, version, data) "
                              "VALUES (?, ?, ?, ?)", (group, kind, object_version, data))
            for kind, object_version in self.published_objects_keys(group):
                if (kind, object_version) not in keep:
                    self._execute("DELETE FROM published_objects WHERE group_id = ? AND "
                                  "kind = ? AND version = ?", (group, kind, object_version))

    def published_objects_keys(self, group: str) -> list[tuple[str, int]]:
        return [(kind, int(version)) for kind, version in self._query(
            "SELECT kind, version FROM published_objects WHERE group_id = ?", (group,))]

    # Sightings

    def add_sightings(self, sightings: Sequence[Sighting]) -> int:
        """Insert sightings, skipping event ids already stored; return how many were new."""
        if not sightings:
            return 0
        now = time.time()
        with self._transaction():
            return self._executemany(
                "INSERT INTO sightings (event_id, device_id, identity_id, name, distance, "
                "gallery_version, model_id, capture_time, received_at, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                [(s.event_id, s.device_id, s.identity_id, s.name, s.distance,
                  s.gallery_version, s.model_id, s.capture_time, now, s.payload)
                 for s in sightings])

    def sightings(self, limit: int = 1000) -> list[Sighting]:
        rows = self._query(
            "SELECT event_id, device_id, identity_id, name, distance, gallery_version, "
            "model_id, capture_time, payload FROM sightings ORDER BY received_at, event_id "
            "LIMIT ?", (limit,))
        return [Sighting(*row) for row in rows]


class SqliteStore(ServerStore):
    """The store in one SQLite file, in WAL mode so readers never block the writer."""

    def __init__(self, path: Path) -> None:
        self.description = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None,
                                       check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA.format(blob="BLOB", serial="INTEGER PRIMARY KEY"))
            self._add_missing_columns()
        except (OSError, sqlite3.Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(f"cannot open the SQLite store {path}: {reason}; set store.path "
                             "to a file in a folder this user can write") from exc
        self._depth = 0

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0
        self._db.execute("COMMIT")

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._db.execute(sql, params)

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        before = self._db.total_changes
        self._db.executemany(sql, rows)
        return self._db.total_changes - before

    def _columns(self, table: str) -> set[str]:
        return {str(row[1]) for row in self._db.execute(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        self._db.close()


class PostgresStore(ServerStore):
    """The store in PostgreSQL through psycopg 3; the schema is created on first use."""

    placeholder = "%s"

    def __init__(self, dsn: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise StoreError("store.backend postgresql needs psycopg; install the server extra "
                             "with pip install 'facenet-edge-agent[server]'") from exc
        try:
            self._conn = psycopg.connect(dsn, autocommit=True)
        except psycopg.ProgrammingError as exc:
            # Its message can quote part of the DSN, which may contain a password.
            raise StoreError("store.dsn is not a valid libpq connection string; expected "
                             "key=value pairs such as 'host=db dbname=facenet'") from exc
        except psycopg.Error as exc:
            # A connection failure names the host and port, not the password.
            reason = " ".join(str(exc).split())
            raise StoreError(f"cannot connect to the PostgreSQL store of store.dsn: {reason}; "
                             "check store.dsn and that the database server accepts "
                             "connections") from exc
        info = self._conn.info
        self.description = f"postgresql://{info.host}:{info.port}/{info.dbname}"
        with self._conn.transaction():
            # Two servers starting at once must not race on CREATE TABLE.
            self._conn.execute("SELECT pg_advisory_xact_lock(7262001)")
            for statement in _SCHEMA.format(blob="BYTEA", serial="BIGSERIAL PRIMARY KEY") \
                    .split(";"):
                if statement.strip():
                    self._conn.execute(_strip_comments(statement))
            self._add_missing_columns()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._conn.transaction():
            yield

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(self._sql(sql), params)

    def _executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        rows = list(rows)
        if not rows:
            return 0
        with self._conn.cursor() as cursor:
            cursor.executemany(self._sql(sql), rows)
            return max(cursor.rowcount, 0)

    def _columns(self, table: str) -> set[str]:
        return {str(row[0]) for row in self._query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))}

    def close(self) -> None:
        self._conn.close()


def _strip_comments(statement: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in statement.splitlines())


def open_store(settings: StoreConfig) -> ServerStore:
    """Open the configured store, creating its tables when they are missing."""
    if settings.backend == "postgresql":
        return PostgresStore(settings.dsn)
    return SqliteStore(settings.path)
