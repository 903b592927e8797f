"""The server store on SQLite and on a real PostgreSQL, and the collector on a real broker.

The PostgreSQL case starts Debian's postgresql binaries (`initdb`, `pg_ctl`)
on a free loopback port in a temporary folder, as the `postgres` user when the
tests run as root. It is skipped when the binaries are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.config import CollectorConfig, MqttConfig
from agent.server.client import ServerClient
from agent.server.collector import SightingsCollector
from agent.server.store import PostgresStore, ServerStore, SqliteStore, StoreError
from tests.broker import MosquittoBroker, free_port

# Debian 12 ships PostgreSQL 15 and Debian 13 ships 17; take the newest installed.
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/nonexistent"),
             key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL not installed; apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="facenet-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
                                 "-U", "postgres", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l",
                                 str(folder / "log"), "-o",
                                 f"-p {port} -h 127.0.0.1 -k {folder} -F", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast",
                                     "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerStore]:
    if request.param == "sqlite":
        opened: ServerStore = SqliteStore(tmp_path / "server.db")
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        opened = PostgresStore(dsn)
        for table in ("server_embeddings", "server_identities", "published_identities",
                      "published_objects", "sightings", "server_groups"):
            opened._execute(f"DELETE FROM {table}")
    yield opened
    opened.close()


def rows(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, 4)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_identities_round_trip(store: ServerStore) -> None:
    store.ensure_group("g", "m", 4, "euclidean")
    store.put_identity("g", "bob", "Bob", rows(2, 1), ["a", "b"])
    store.put_identity("g", "alice", "Alice", rows(1, 2), ["c"])
    store.put_identity("g", "bob", "Robert", rows(3, 3), ["d", "e", "f"])

    identities = store.identities("g")

    assert [i.identity_id for i in identities] == ["alice", "bob"]
    assert identities[1].name == "Robert"
    np.testing.assert_array_equal(identities[1].vectors, rows(3, 3))
    assert store.remove_identity("g", "alice")
    assert not store.remove_identity("g", "alice")


def test_group_model_mismatch_rejected(store: ServerStore) -> None:
    store.ensure_group("g", "m", 4, "euclidean")

    with pytest.raises(StoreError, match="uses model m"):
        store.ensure_group("g", "other", 4, "euclidean")


def test_publication_version_is_monotonic(store: ServerStore) -> None:
    store.ensure_group("g", "m", 4, "euclidean")
    store.commit_publication("g", 1, b"manifest-1", {"a": "d1"}, {("snapshot", 1): b"s"},
                             {("snapshot", 1)})

    with pytest.raises(StoreError, match="another publisher"):
        store.commit_publication("g", 3, b"manifest-3", {}, {}, set())
    assert store.group_info("g").version == 1
    assert store.published_digests("g") == {"a": "d1"}
    assert store.published_objects("g") == {("snapshot", 1): b"s"}


def test_unpublished_changes_found(store: ServerStore) -> None:
    store.ensure_group("g", "m", 4, "euclidean")
    store.put_identity("g", "a", "A", rows(1, 1), ["s"])
    store.put_identity("g", "b", "B", rows(1, 2), ["s"])
    store.commit_publication("g", 1, b"m1", {i.identity_id: i.digest
                                             for i in store.identities("g")}, {}, set())
    store.put_identity("g", "a", "A", rows(1, 3), ["s"])
    store.remove_identity("g", "b")
    store.put_identity("g", "c", "C", rows(1, 4), ["s"])

    changed, removed = store.unpublished_changes("g")

    assert changed == {"a": True, "c": False}
    assert removed == ["b"]


def test_sightings_skip_duplicate_events(store: ServerStore) -> None:
    from agent.server.store import Sighting

    sighting = Sighting("e1", "gate-01", "bob", "Bob", 0.5, 3, "m", "2026-01-01T00:00:00Z", "{}")

    assert store.add_sightings([sighting]) == 1
    assert store.add_sightings([sighting]) == 0
    assert [s.event_id for s in store.sightings()] == ["e1"]


def event(device: str, identity: str | None) -> bytes:
    return json.dumps({
        "event_id": str(uuid.uuid4()), "device_id": device,
        "identity": {"id": identity, "name": identity, "known": identity is not None},
        "distance": 0.4, "gallery_version": 2, "model_id": "m",
        "capture_time": "2026-01-01T00:00:00.000Z",
    }).encode()


def test_shared_collectors_store_each_event_once(mqtt_broker: MosquittoBroker,
                                                 tmp_path: Path) -> None:
    settings = MqttConfig(host=mqtt_broker.host, port=mqtt_broker.port, topic_prefix="fn",
                          reconnect_min_delay_s=0.05, reconnect_max_delay_s=0.2)
    store_path = tmp_path / "server.db"
    stop = threading.Event()
    collectors = []
    threads = []
    for number in range(2):
        client = ServerClient(settings, f"collector-{number}")
        collector = SightingsCollector(SqliteStore(store_path), client, "fn",
                                       CollectorConfig(batch_size=10))
        collector.start()
        client.start()
        assert client.wait_connected(5.0)
        collectors.append((client, collector))
        thread = threading.Thread(target=collector.serve, args=(stop,), daemon=True)
        thread.start()
        threads.append(thread)
    time.sleep(0.3)  # both SUBACKs

    sender = mqtt_broker.subscriber("unused/topic")  # a connected paho client
    for index in range(40):
        sender._client.publish(f"fn/gate-{index % 3}/events/identity",
                               event(f"gate-{index % 3}", "bob"), qos=1)
    sender._client.publish("fn/gate-0/events/identity", b"{broken", qos=1)
    sender._client.publish("fn/gate-0/events/identity", b'{"event_id": "x"}', qos=1)

    reader = SqliteStore(store_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(reader.sightings()) < 40:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(5)

    assert len(reader.sightings()) == 40
    assert all(c.stored > 0 for _, c in collectors), [c.stored for _, c in collectors]
    assert sum(c.rejected for _, c in collectors) == 2
    for client, _ in collectors:
        client.stop()
    reader.close()


def test_store_without_digest_column_upgraded(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE server_groups (group_id TEXT PRIMARY KEY, model_id TEXT NOT NULL,
                embedding_size INTEGER NOT NULL, metric TEXT NOT NULL,
                version BIGINT NOT NULL DEFAULT 0, manifest BLOB);
            CREATE TABLE server_identities (group_id TEXT NOT NULL, identity_id TEXT NOT NULL,
                name TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (group_id, identity_id));
            CREATE TABLE server_embeddings (id INTEGER PRIMARY KEY, group_id TEXT NOT NULL,
                identity_id TEXT NOT NULL, vector BLOB NOT NULL, source TEXT NOT NULL);
            INSERT INTO server_groups (group_id, model_id, embedding_size, metric)
                VALUES ('g', 'm', 4, 'euclidean');
            INSERT INTO server_identities VALUES ('g', 'bob', 'Bob', 0);
        """)
        db.execute("INSERT INTO server_embeddings (group_id, identity_id, vector, source) "
                   "VALUES ('g', 'bob', ?, 'a')", (rows(1, 5).tobytes(),))

    store = SqliteStore(path)
    store.put_identity("g", "alice", "Alice", rows(1, 6), ["b"])
    changed, removed = store.unpublished_changes("g")
    store.commit_publication("g", 1, b"m", {i.identity_id: i.digest
                                            for i in store.identities("g")}, {}, set())

    assert changed == {"alice": False, "bob": False}
    assert removed == []
    assert store.unpublished_changes("g") == ({}, [])
    store.close()


def test_small_delta_reads_changed_rows_only(tmp_path: Path) -> None:
    from nacl.signing import SigningKey

    from agent.config import PublishConfig
    from agent.server.publisher import GalleryPublisher

    store = SqliteStore(tmp_path / "server.db")
    store.ensure_group("g", "m", 4, "euclidean")
    store.put_identities("g", [(f"p{i}", "P", rows(1, i), ["s"]) for i in range(50)])
    publisher = GalleryPublisher(store, None, SigningKey.generate(),  # type: ignore[arg-type]
                                 "fn", PublishConfig(groups=["g"]))
    assert publisher.prepare("g") is not None
    reads: list[object] = []
    read_identities = store.identities
    store.identities = lambda group, ids=None: (  # type: ignore[method-assign]
        reads.append(ids) or read_identities(group, ids))
    store.put_identity("g", "p7", "Renamed", rows(1, 99), ["s"])
    store.remove_identity("g", "p8")

    publication = publisher.prepare("g")

    assert publication is not None
    assert reads == [["p7"]]
    assert publication.version == 2
    assert publication.manifest.snapshot.version == 1
    assert publisher.prepare("g") is None
    store.close()
