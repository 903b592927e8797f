"""The outbox: a durable, bounded FIFO of events that the broker has not acknowledged yet.

Every event is inserted here before it is published and deleted only after the
broker's PUBACK, so an event survives a broker outage, a crash and a restart of
the agent. Rows are numbered by an AUTOINCREMENT `seq` that SQLite never reuses,
so `seq` order is the order in which events were produced, across restarts too.

Durability: the file runs in WAL mode. With `sync="full"` (SQLite
`synchronous=FULL`) every insert and delete commits with an fsync of the WAL, so a
committed event survives a power cut. With `sync="normal"` the WAL is synced only
at checkpoints: a killed process still loses nothing, because its writes are in
the kernel's page cache, but a power cut can lose the last commits.

Bounds: at most `max_events` rows, `max_bytes` payload bytes and `ttl_s` seconds
of age. When an insert would pass a bound, `full_policy` decides: "drop_oldest"
deletes the oldest rows to make room, "reject_new" refuses the new event. Either
way the count of dropped events is stored in the same file.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL  -- seconds since the Unix epoch
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Events that the MQTT client rejected before sending (a topic with a wildcard,
-- say). They are kept for inspection and never sent again.
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

FULL_POLICIES = ("drop_oldest", "reject_new")
SYNC_MODES = ("full", "normal")

# Names of the drop counters in the counters table.
DROPPED_FULL = "dropped_full"
DROPPED_EXPIRED = "dropped_expired"
DROPPED_UNPUBLISHABLE = "dropped_unpublishable"


class OutboxError(RuntimeError):
    """The outbox file cannot be opened or used; the message names the file and the fix."""


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    event_id: str
    topic: str
    payload: bytes
    created_at: float


class Outbox:
    """The SQLite outbox at `path`. All methods are thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        max_events: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        ttl_s: float = 7 * 24 * 3600.0,
        full_policy: str = "drop_oldest",
        sync: str = "full",
        clock: Callable[[], float] = time.time,
        device_id: str | None = None,
    ) -> None:
        """Open or create the outbox; raise OutboxError when the file is unusable.

        With `device_id`, the outbox records that id on first open and raises
        OutboxError when it already records another one, so that two agents on one
        host cannot publish each other's events through a shared default path.
        """
        if full_policy not in FULL_POLICIES:
            raise ValueError(f"full_policy must be one of {FULL_POLICIES}, got {full_policy!r}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if max_events < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError(
                f"max_events, max_bytes and ttl_s must be positive, got {max_events}, "
                f"{max_bytes} and {ttl_s}"
            )
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.full_policy = full_policy
        self._clock = clock
        self._lock = threading.Lock()
        self._db = self._open(path, sync)
        if device_id is not None:
            self._claim(device_id)
        with self._lock:
            count, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events"
            ).fetchone()
            self._depth = int(count)
            self._bytes = int(size)
            self._counters = dict(self._db.execute("SELECT name, value FROM counters"))
        log.info(
            "outbox %s: opened with %d events (%d bytes) waiting; limits %d events, %d bytes, "
            "%.0f s, policy %s, sync %s",
            path, self._depth, self._bytes, max_events, max_bytes, ttl_s, full_policy, sync,
        )

    @staticmethod
    def _open(path: Path, sync: str) -> sqlite3.Connection:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise OutboxError(
                    f"outbox {path}: SQLite could not switch to WAL mode (got {mode!r}); "
                    "put the outbox on a local file system"
                )
            db.execute(f"PRAGMA synchronous={sync.upper()}")
            db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(
                f"outbox {path}: cannot open it: {exc}. If the file is damaged, move it aside "
                "and the agent starts a new one; the events in it are then not sent"
            ) from exc
        return db

    def _claim(self, device_id: str) -> None:
        try:
            self._db.execute(
                "INSERT OR IGNORE INTO meta (name, value) VALUES ('device_id', ?)", (device_id,)
            )
            (owner,) = self._db.execute(
                "SELECT value FROM meta WHERE name = 'device_id'"
            ).fetchone()
        except sqlite3.Error as exc:
            self._db.close()
            raise OutboxError(f"outbox {self.path}: cannot read its owner: {exc}") from exc
        if owner != device_id:
            self._db.close()
            raise OutboxError(
                f"outbox {self.path}: belongs to device {owner!r}, not {device_id!r}; set "
                "outbox.path to a file of this device's own, so that it does not publish "
                "the other device's events"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Counts

    @property
    def depth(self) -> int:
        """Number of events waiting for a PUBACK, including those already sent."""
        with self._lock:
            return self._depth

    @property
    def size_bytes(self) -> int:
        """Payload bytes of the waiting events."""
        with self._lock:
            return self._bytes

    @property
    def dropped_full(self) -> int:
        """Events dropped, over the file's lifetime, because the outbox was full."""
        with self._lock:
            return self._counters.get(DROPPED_FULL, 0)

    @property
    def dropped_expired(self) -> int:
        """Events dropped, over the file's lifetime, because they outlived `ttl_s`."""
        with self._lock:
            return self._counters.get(DROPPED_EXPIRED, 0)

    @property
    def dropped_unpublishable(self) -> int:
        """Events moved to the dead_letters table, over the file's lifetime."""
        with self._lock:
            return self._counters.get(DROPPED_UNPUBLISHABLE, 0)

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_expired + self.dropped_unpublishable

    # Queue operations

    def put(self, event_id: str, topic: str, payload: bytes) -> bool:
        """Store one event durably; return False when the policy rejected it.

        Storing an event_id that is already waiting does nothing and returns True.
        """
        size = len(payload)
        if size > self.max_bytes:
            self._count_drop(DROPPED_FULL, 1)
            log.error(
                "outbox %s: event %s rejected: its %d bytes exceed max_bytes %d",
                self.path, event_id, size, self.max_bytes,
            )
            return False

        with self._lock:
            dropped_ids: list[str] = []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._is_full(size):
                    if self.full_policy == "reject_new":
                        self._add_counter(DROPPED_FULL, 1)
                        self._db.execute("COMMIT")
                        rejected = True
                    else:
                        dropped_ids = self._drop_oldest_for(size)
                        rejected = False
                else:
                    rejected = False
                if not rejected:
                    inserted = self._db.execute(
                        "INSERT OR IGNORE INTO events (event_id, topic, payload, created_at) "
                        "VALUES (?, ?, ?, ?)",
                        (event_id, topic, payload, self._clock()),
                    ).rowcount
                    self._db.execute("COMMIT")
                    if inserted:
                        self._depth += 1
                        self._bytes += size
            except BaseException:
                self._rollback()
                raise
            depth = self._depth

        if rejected:
            log.warning(
                "outbox %s: full (%d events, limits %d events and %d bytes); rejected new "
                "event %s",
                self.path, depth, self.max_events, self.max_bytes, event_id,
            )
            return False
        if dropped_ids:
            log.warning(
                "outbox %s: full; dropped the %d oldest events (first %s, last %s) to store "
                "event %s",
                self.path, len(dropped_ids), dropped_ids[0], dropped_ids[-1], event_id,
            )
        return True

    def pending(self, after_seq: int, limit: int) -> list[OutboxEntry]:
        """Return up to `limit` waiting events with seq > `after_seq`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, topic, payload, created_at FROM events "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [OutboxEntry(seq, event_id, topic, bytes(payload), created_at)
                for seq, event_id, topic, payload, created_at in rows]

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete the events with these seq numbers in one transaction; return how many."""
        wanted = sorted(set(seqs))
        if not wanted:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed, size = self._delete_seqs(wanted)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._depth -= removed
            self._bytes -= size
        return removed

    def dead_letter(self, seq: int, reason: str) -> bool:
        """Move the event `seq` to the dead_letters table; return False if it is gone."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                moved = self._db.execute(
                    "INSERT OR REPLACE INTO dead_letters "
                    "(seq, event_id, topic, payload, created_at, failed_at, reason) "
                    "SELECT seq, event_id, topic, payload, created_at, ?, ? FROM events "
                    "WHERE seq = ?",
                    (self._clock(), reason, seq),
                ).rowcount
                removed, size = self._delete_seqs([seq])
                self._add_counter(DROPPED_UNPUBLISHABLE, removed)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._depth -= removed
            self._bytes -= size
        return bool(moved)

    def expire(self) -> int:
        """Drop the events older than `ttl_s`; return how many were dropped.

        NOTE: age is measured on the wall clock, because it must survive restarts.
        A board without a real-time clock that boots in 1970 and then jumps forward
        at its first NTP sync makes the events it stored before the jump look old.
        """
        cutoff = self._clock() - self.ttl_s
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT seq, event_id FROM events WHERE created_at < ? ORDER BY seq",
                    (cutoff,),
                ).fetchall()
                removed, size = self._delete_seqs([seq for seq, _ in rows])
                if removed:
                    self._add_counter(DROPPED_EXPIRED, removed)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._depth -= removed
            self._bytes -= size
        if removed:
            log.warning(
                "outbox %s: dropped %d events older than %.0f s (first %s, last %s)",
                self.path, removed, self.ttl_s, rows[0][1], rows[-1][1],
            )
        return removed

    # Helpers; the caller holds self._lock and has begun a transaction where noted.

    def _is_full(self, size: int) -> bool:
        return self._depth + 1 > self.max_events or self._bytes + size > self.max_bytes

    def _drop_oldest_for(self, size: int) -> list[str]:
        """Delete the oldest rows until one of `size` bytes fits; inside a transaction."""
        dropped_ids: list[str] = []
        cursor = self._db.execute("SELECT seq, event_id, LENGTH(payload) FROM events ORDER BY seq")
        depth, total = self._depth, self._bytes
        seqs = []
        for seq, event_id, length in cursor:
            if depth + 1 <= self.max_events and total + size <= self.max_bytes:
                break
            seqs.append(seq)
            dropped_ids.append(event_id)
            depth -= 1
            total -= length
        cursor.close()
        removed, removed_size = self._delete_seqs(seqs)
        self._add_counter(DROPPED_FULL, removed)
        self._depth -= removed
        self._bytes -= removed_size
        return dropped_ids

    def _delete_seqs(self, seqs: list[int]) -> tuple[int, int]:
        """Delete rows by seq inside a transaction; return the count and their payload bytes."""
        removed = size = 0
        # SQLite before 3.32 allows at most 999 parameters per statement.
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            count, chunk_size = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events "
                f"WHERE seq IN ({marks})",
                chunk,
            ).fetchone()
            self._db.execute(f"DELETE FROM events WHERE seq IN ({marks})", chunk)
            removed += int(count)
            size += int(chunk_size)
        return removed, size

    def _add_counter(self, name: str, amount: int) -> None:
        """Add to a persistent counter inside a transaction and mirror it in memory."""
        if amount <= 0:
            return
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )
        self._counters[name] = self._counters.get(name, 0) + amount

    def _count_drop(self, name: str, amount: int) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._add_counter(name, amount)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """Roll back the open transaction and re-read the counts it may have changed."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        count, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM events"
        ).fetchone()
        self._depth, self._bytes = int(count), int(size)
        self._counters = dict(self._db.execute("SELECT name, value FROM counters"))
