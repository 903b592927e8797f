"""Gallery sync between the server publisher and the agent, over a real mosquitto.

The server side is agent.server.publisher with a SQLite store; the agent side is
agent.gallery_sync with the agent's own MQTT client. Hostile messages are
published by a plain paho client with the server's key where a valid signature
is part of the case. Embeddings are 8-d so that each test takes about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from nacl.signing import SigningKey

from agent.config import MqttConfig, PublishConfig, SyncConfig
from agent.gallery import Gallery
from agent.gallery_protocol import (
    chunk_topic,
    describe_object,
    digest_chunk_topic,
    encode_object,
    manifest_topic,
    object_entry,
    parse_manifest,
    resync_topic,
    sign_manifest,
    split_chunks,
    with_digest_list,
)
from agent.gallery_sync import GallerySync
from agent.mqtt import MqttPublisher
from agent.server.client import ServerClient
from agent.server.publisher import GalleryPublisher
from agent.server.store import SqliteStore
from tests.broker import MosquittoBroker

PREFIX = "facenet-test"
GROUP = "lobby"
MODEL = "test-model"
SIZE = 8
TIMEOUT_S = 10.0


def unit_rows(count: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, SIZE)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def gallery_rows(path: Path) -> tuple[int, dict[str, int]]:
    """Read version and embeddings per identity from the file, bypassing the Gallery class."""
    with sqlite3.connect(path) as db:
        version_row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        counts = dict(db.execute(
            "SELECT identity_id, COUNT(*) FROM embeddings GROUP BY identity_id").fetchall())
    return int(version_row[0]) if version_row else 0, counts


@dataclass
class Server:
    store: SqliteStore
    client: ServerClient
    publisher: GalleryPublisher
    key: SigningKey

    def enrol(self, count: int, seed: int = 0, per_identity: int = 2) -> None:
        rows = unit_rows(count * per_identity, seed)
        self.store.put_identities(GROUP, [
            (f"person-{i:04d}", f"Person {i}", rows[i * per_identity:(i + 1) * per_identity],
             ["test"] * per_identity)
            for i in range(count)
        ])


@dataclass
class Agent:
    gallery: Gallery
    client: MqttPublisher
    sync: GallerySync


@pytest.fixture
def server(mqtt_broker: MosquittoBroker, tmp_path: Path) -> Iterator[Server]:
    store = SqliteStore(tmp_path / "server.db")
    store.ensure_group(GROUP, MODEL, SIZE, "euclidean")
    settings = MqttConfig(host=mqtt_broker.host, port=mqtt_broker.port, topic_prefix=PREFIX,
                          reconnect_min_delay_s=0.05, reconnect_max_delay_s=0.2)
    client = ServerClient(settings, f"test-server-{uuid.uuid4().hex[:6]}")
    key = SigningKey.generate()
    publisher = GalleryPublisher(store, client, key, PREFIX, PublishConfig(
        groups=[GROUP], chunk_bytes=1024, max_deltas=4, resync_min_interval_s=0.0))
    client.start()
    assert client.wait_connected(TIMEOUT_S)
    yield Server(store, client, publisher, key)
    client.stop()
    store.close()


@pytest.fixture
def make_agent(mqtt_broker: MosquittoBroker, server: Server,
               tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(path: Path | None = None, **sync_options: Any) -> Agent:
        gallery = Gallery(path or tmp_path / "gallery.db", MODEL, SIZE)
        client = MqttPublisher(mqtt_broker.host, mqtt_broker.port,
                               f"test-agent-{uuid.uuid4().hex[:6]}",
                               status_topic=f"{PREFIX}/gate-01/status",
                               reconnect_min_delay_s=0.05, reconnect_max_delay_s=0.2)
        options: dict[str, Any] = {"fetch_timeout_s": 1.0, "resync_interval_s": 0.5,
                                   "max_message_bytes": 16 * 1024}
        options.update(sync_options)
        settings = SyncConfig(group=GROUP, public_key=_public_key(server.key), **options)
        sync = GallerySync(gallery=gallery, publisher=client, device_id="gate-01",
                           topic_prefix=PREFIX, settings=settings, model_id=MODEL,
                           embedding_size=SIZE, metric="euclidean")
        client.start()
        sync.start()
        assert client.wait_connected(TIMEOUT_S)
        agent = Agent(gallery, client, sync)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.sync.stop()
        agent.client.stop(timeout_s=0.5)
        agent.gallery.close()


def _public_key(key: SigningKey) -> str:
    import base64

    return base64.b64encode(bytes(key.verify_key)).decode()


class RawClient:
    """A paho client that publishes whatever a test hands it, retained or not."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"test-raw-{uuid.uuid4().hex[:6]}")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw(mqtt_broker: MosquittoBroker) -> Iterator[RawClient]:
    client = RawClient(mqtt_broker)
    yield client
    client.close()


# Happy paths


def test_snapshot_then_deltas_reach_agent(server: Server,
                                          make_agent: Callable[..., Agent]) -> None:
    server.enrol(20)
    assert server.publisher.publish_group(GROUP) == 1
    agent = make_agent()

    assert wait_until(lambda: agent.gallery.version == 1)
    assert agent.gallery.identity_count == 20
    assert agent.gallery.embedding_count == 40

    server.store.put_identity(GROUP, "person-0000", "Renamed", unit_rows(3, 99), ["a"] * 3)
    server.store.remove_identity(GROUP, "person-0001")
    server.enrol(1, seed=7)  # replaces person-0000 again with 2 rows of seed 7
    server.store.put_identity(GROUP, "newcomer", "New", unit_rows(1, 5), ["n"])
    assert server.publisher.publish_group(GROUP) == 2

    assert wait_until(lambda: agent.gallery.version == 2)
    version, counts = gallery_rows(agent.gallery.path)
    assert version == 2
    assert "person-0001" not in counts
    assert counts["newcomer"] == 1
    assert counts["person-0000"] == 2
    assert agent.gallery.identity_count == 20


def test_gallery_matches_server_rows(server: Server, make_agent: Callable[..., Agent]) -> None:
    server.enrol(5, per_identity=3)
    server.publisher.publish_group(GROUP)
    agent = make_agent()
    assert wait_until(lambda: agent.gallery.version == 1)

    probe = server.store.identities(GROUP)[3].vectors[1]
    (match,) = agent.gallery.match(probe[None], threshold=0.5, metric="euclidean")

    assert match.identity_id == "person-0003"
    assert match.distance == pytest.approx(0.0, abs=1e-3)
    assert match.gallery_version == 1


def test_status_reports_gallery_version(mqtt_broker: MosquittoBroker, server: Server,
                                        make_agent: Callable[..., Agent]) -> None:
    server.enrol(3)
    server.publisher.publish_group(GROUP)
    agent = make_agent()
    assert wait_until(lambda: agent.gallery.version == 1)
    assert agent.client.wait_for_delivery(TIMEOUT_S)

    status = mqtt_broker.subscriber(f"{PREFIX}/gate-01/status").wait_for(1)[-1]

    assert json.loads(status.payload) == {"state": "online", "gallery_version": 1,
                                          "gallery_group": GROUP}


def test_agent_offline_keeps_gallery(server: Server, make_agent: Callable[..., Agent],
                                     mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    server.enrol(4)
    server.publisher.publish_group(GROUP)
    first = make_agent()
    assert wait_until(lambda: first.gallery.version == 1)
    first.sync.stop()
    first.client.stop(timeout_s=0.5)
    first.gallery.close()
    mqtt_broker.stop()

    reopened = Gallery(tmp_path / "gallery.db", MODEL, SIZE)

    assert reopened.version == 1
    assert reopened.identity_count == 4
    reopened.close()


def test_new_snapshot_keeps_recent_deltas(server: Server,
                                          make_agent: Callable[..., Agent]) -> None:
    server.enrol(30)
    server.publisher.publish_group(GROUP)
    agent = make_agent()
    assert wait_until(lambda: agent.gallery.version == 1)
    for version in range(2, 8):
        server.store.put_identity(GROUP, f"extra-{version}", "x", unit_rows(1, version), ["x"])
        server.publisher.publish_group(GROUP)

    manifest = parse_manifest(server.store.group_info(GROUP).manifest or b"",
                              bytes(server.key.verify_key))

    assert manifest.version == 7
    assert manifest.snapshot.version == 6  # max_deltas=4 forced a new snapshot
    assert manifest.deltas[0].base_version is not None
    assert manifest.deltas[0].base_version <= 6
    assert wait_until(lambda: agent.gallery.version == 7)
    assert agent.gallery.identity_count == 36


# Broker and agent failures


def test_broker_killed_mid_snapshot(server: Server, make_agent: Callable[..., Agent],
                                    mqtt_broker: MosquittoBroker, tmp_path: Path) -> None:
    server.enrol(400)  # about 26 KB in 1 KB chunks
    agent = make_agent()
    observed: list[tuple[int, int]] = []
    publication = server.publisher.prepare(GROUP)
    assert publication is not None

    # Send half of the chunks, then take the broker down: it has no persistence,
    # so every retained chunk and the manifest are gone when it comes back.
    manifest = publication.manifest
    chunks = [(k, v, i, c) for (k, v), data in publication.new_objects.items()
              for i, c in enumerate(data[j:j + 1024] for j in range(0, len(data), 1024))]
    server.client.publish(manifest_topic(PREFIX, GROUP),
                          server.store.group_info(GROUP).manifest or b"", retain=True)
    for kind, version, index, chunk in chunks[: len(chunks) // 2]:
        server.client.publish(chunk_topic(PREFIX, GROUP, kind, version, index), chunk,
                              retain=True)
    assert server.client.wait_for_delivery(TIMEOUT_S)
    observed.append(gallery_rows(agent.gallery.path))
    mqtt_broker.stop()
    observed.append(gallery_rows(agent.gallery.path))
    mqtt_broker.start()

    # The server republishes its manifest on reconnect; the agent's fetch times
    # out and asks for a resync, which the serving publisher answers.
    import threading

    stop = threading.Event()
    serving = threading.Thread(target=server.publisher.serve, args=(stop,), daemon=True)
    serving.start()
    try:
        assert wait_until(lambda: (observed.append(gallery_rows(agent.gallery.path))
                                   or agent.gallery.version == manifest.version), 30.0)
    finally:
        stop.set()
        serving.join(10)

    assert all(version == 0 and not counts for version, counts in observed[:-1])
    version, counts = gallery_rows(agent.gallery.path)
    assert version == 1
    assert len(counts) == 400
    assert set(counts.values()) == {2}


def test_agent_restart_resumes_from_applied_version(
        server: Server, make_agent: Callable[..., Agent], tmp_path: Path) -> None:
    server.enrol(6)
    server.publisher.publish_group(GROUP)
    first = make_agent()
    assert wait_until(lambda: first.gallery.version == 1)
    first.sync.stop()
    first.client.stop(timeout_s=0.5)
    first.gallery.close()
    server.store.remove_identity(GROUP, "person-0002")
    server.publisher.publish_group(GROUP)

    second = make_agent()

    assert wait_until(lambda: second.gallery.version == 2)
    assert second.gallery.identity_count == 5


# Hostile and broken messages


@dataclass(frozen=True)
class Forged:
    """A manifest and chunks made by hand, signed by `key`."""

    manifest: bytes
    chunks: dict[str, bytes]


def forge(key: SigningKey, *, version: int = 1, base: int | None = None,
          rows: np.ndarray | None = None, model_id: str = MODEL, size: int = SIZE,
          identities: list[tuple[str, str, str, np.ndarray]] | None = None,
          chunk_bytes: int = 1024, body_edit: Callable[[dict], None] | None = None,
          data_edit: Callable[[bytes], bytes] | None = None,
          digest_list: bool = False) -> Forged:
    """Sign a manifest for one new object; `digest_list` moves its chunk digests to a list."""
    kind = "snapshot" if base is None else "delta"
    vectors = rows if rows is not None else unit_rows(2, version)
    changes = identities or [(f"forged-{version}", "Forged", "add", vectors)]
    data = encode_object(kind, group=GROUP, version=version, base_version=base,
                         model_id=model_id, embedding_size=size, changes=changes)
    info = describe_object(kind, data, version=version, base_version=base,
                           chunk_bytes=chunk_bytes, identities=len(changes),
                           embeddings=sum(len(c[3]) for c in changes))
    list_chunks: dict[str, bytes] = {}
    if digest_list:
        info, list_data = with_digest_list(info, chunk_bytes)
        list_chunks = {digest_chunk_topic(PREFIX, GROUP, kind, version, i): chunk
                       for i, chunk in enumerate(split_chunks(list_data, chunk_bytes))}
    if data_edit is not None:
        data = data_edit(data)
    snapshot = info if kind == "snapshot" else replace(info, kind="snapshot", version=base or 1,
                                                       base_version=None)
    body = {
        "schema": 1, "group": GROUP, "version": version, "model_id": model_id,
        "embedding_size": size, "metric": "euclidean", "chunk_bytes": chunk_bytes,
        "published_at": "2026-01-01T00:00:00.000+00:00",
        "snapshot": object_entry(snapshot),
        "deltas": [] if kind == "snapshot" else [object_entry(info)],
    }
    if body_edit is not None:
        body_edit(body)
    chunks = {chunk_topic(PREFIX, GROUP, kind, version, i // chunk_bytes):
              data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)}
    return Forged(sign_manifest(body, key), {**list_chunks, **chunks})


def send(raw: RawClient, forged: Forged, chunks_first: bool = True) -> None:
    if not chunks_first:
        raw.publish(manifest_topic(PREFIX, GROUP), forged.manifest, retain=True)
    for topic, chunk in forged.chunks.items():
        raw.publish(topic, chunk, retain=True)
    if chunks_first:
        raw.publish(manifest_topic(PREFIX, GROUP), forged.manifest, retain=True)


@pytest.fixture
def synced(server: Server, make_agent: Callable[..., Agent], raw: RawClient) -> Agent:
    """An agent at version 1 of a forged gallery: identity forged-1 with 2 embeddings."""
    agent = make_agent()
    send(raw, forge(server.key, version=1))
    assert wait_until(lambda: agent.gallery.version == 1)
    return agent


def assert_unchanged_and_alive(agent: Agent, server: Server, raw: RawClient,
                               caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """The rejection was logged, the gallery is still version 1, and a good delta applies."""
    assert wait_until(lambda: f"gallery sync rejected ({reason})" in caplog.text), caplog.text
    assert agent.gallery.version == 1
    assert gallery_rows(agent.gallery.path) == (1, {"forged-1": 2})
    assert agent.client.is_connected()
    good = forge(server.key, version=2, base=1,
                 identities=[("after", "After", "add", unit_rows(1, 42))])
    send(raw, good)
    assert wait_until(lambda: agent.gallery.version == 2), caplog.text


Case = Callable[[SigningKey], tuple[str, list[tuple[str, bytes]]]]


def _manifest_only(payload: bytes) -> list[tuple[str, bytes]]:
    return [(manifest_topic(PREFIX, GROUP), payload)]


def _as_messages(forged: Forged) -> list[tuple[str, bytes]]:
    return [*forged.chunks.items(), (manifest_topic(PREFIX, GROUP), forged.manifest)]


def _nan_rows() -> np.ndarray:
    rows = unit_rows(1, 3)
    rows[0, 2] = np.nan
    return rows


def _resigned_with_other_key(key: SigningKey) -> tuple[str, list[tuple[str, bytes]]]:
    forged = forge(SigningKey.generate(), version=2, base=1)
    return "bad_signature", _as_messages(forged)


def _tampered_text(key: SigningKey) -> tuple[str, list[tuple[str, bytes]]]:
    forged = forge(key, version=2, base=1)
    envelope = json.loads(forged.manifest)
    envelope["manifest"] = envelope["manifest"].replace('"version":2', '"version":3')
    return "bad_signature", _manifest_only(json.dumps(envelope).encode())


def _truncated_chunk(key: SigningKey) -> tuple[str, list[tuple[str, bytes]]]:
    forged = forge(key, version=2, base=1)
    topic, chunk = next(iter(forged.chunks.items()))
    return "truncated", [(topic, chunk[:-7]), (manifest_topic(PREFIX, GROUP), forged.manifest)]


def _corrupt_chunk(key: SigningKey) -> tuple[str, list[tuple[str, bytes]]]:
    forged = forge(key, version=2, base=1)
    topic, chunk = next(iter(forged.chunks.items()))
    flipped = bytes([chunk[0] ^ 1]) + chunk[1:]
    return "digest", [(topic, flipped), (manifest_topic(PREFIX, GROUP), forged.manifest)]


CASES: dict[str, Case] = {
    "bad_json": lambda key: ("invalid_json", _manifest_only(b"{not json")),
    "not_utf8": lambda key: ("invalid_json", _manifest_only(b"\xff\xfe{}")),
    "oversized": lambda key: ("oversized", _manifest_only(b"x" * (20 * 1024))),
    "missing_fields": lambda key: ("invalid_manifest", _manifest_only(b'{"manifest": 1}')),
    "bad_signature": _resigned_with_other_key,
    "tampered_manifest": _tampered_text,
    "wrong_model": lambda key: ("wrong_model", _as_messages(
        forge(key, version=2, base=1, model_id="other-model"))),
    "wrong_embedding_size": lambda key: ("wrong_embedding_size", _as_messages(
        forge(key, version=2, base=1, size=16, rows=np.eye(16, dtype=np.float32)[:1]))),
    "nan_in_vectors": lambda key: ("not_finite", _as_messages(
        forge(key, version=2, base=1, rows=_nan_rows()))),
    "inf_in_vectors": lambda key: ("not_finite", _as_messages(
        forge(key, version=2, base=1, rows=np.full((1, SIZE), np.inf, np.float32)))),
    "nan_in_manifest": lambda key: ("not_finite", _manifest_only(
        b'{"manifest": "{}", "signature": NaN}')),
    "inf_in_manifest": lambda key: ("not_finite", _manifest_only(
        b'{"manifest": "{}", "signature": "", "size": -Infinity}')),
    "not_normalised": lambda key: ("not_normalized", _as_messages(
        forge(key, version=2, base=1, rows=np.full((1, SIZE), 3.0, np.float32)))),
    "truncated_chunk": _truncated_chunk,
    "corrupt_chunk": _corrupt_chunk,
    "older_version": lambda key: ("rollback", _manifest_only(forge(key, version=1).manifest
                                                             .replace(b"", b""))),
    "remove_missing_identity": lambda key: ("does_not_apply", _as_messages(forge(
        key, version=2, base=1,
        identities=[("nobody", "", "remove", np.empty((0, SIZE), np.float32))]))),
    "add_existing_identity": lambda key: ("does_not_apply", _as_messages(forge(
        key, version=2, base=1, identities=[("forged-1", "Again", "add", unit_rows(1, 1))]))),
    "wrong_chunk_index": lambda key: ("bad_chunk_index", [
        (chunk_topic(PREFIX, GROUP, "delta", 2, 9), b"x"),
        *_as_messages(forge(key, version=2, base=1))[:0],
        (manifest_topic(PREFIX, GROUP), forge(key, version=2, base=1).manifest)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_message_rejected(case: str, synced: Agent, server: Server, raw: RawClient,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reason, messages = CASES[case](server.key)
    if case == "older_version":
        # Version 0 does not exist, so roll back by first moving the agent to 2.
        send(raw, forge(server.key, version=2, base=1,
                        identities=[("second", "Second", "add", unit_rows(1, 8))]))
        assert wait_until(lambda: synced.gallery.version == 2)
        raw.publish(manifest_topic(PREFIX, GROUP), messages[0][1], retain=True)
        assert wait_until(lambda: "gallery sync rejected (rollback)" in caplog.text)
        assert synced.gallery.version == 2
        assert synced.client.is_connected()
        return

    for topic, payload in messages:
        raw.publish(topic, payload, retain=topic.endswith("/manifest"))
    if case == "wrong_chunk_index":
        # The chunk came before its manifest, so it only surfaces once the
        # manifest arrives; publish it again now that the delta is expected.
        assert wait_until(lambda: synced.sync._target is not None)
        raw.publish(chunk_topic(PREFIX, GROUP, "delta", 2, 9), b"x")

    assert_unchanged_and_alive(synced, server, raw, caplog, reason)


def test_duplicates_and_replays_ignored(synced: Agent, server: Server, raw: RawClient,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.gallery_sync")
    first = forge(server.key, version=1)
    delta = forge(server.key, version=2, base=1,
                  identities=[("second", "Second", "add", unit_rows(1, 8))])

    send(raw, first)  # the applied version again
    send(raw, delta)
    send(raw, delta)  # the whole delta again
    for topic, chunk in delta.chunks.items():
        raw.publish(topic, chunk)  # chunks of an applied version
    assert wait_until(lambda: synced.gallery.version == 2)
    assert synced.sync.wait_idle(TIMEOUT_S)

    assert gallery_rows(synced.gallery.path) == (2, {"forged-1": 2, "second": 1})
    assert "repeats applied version 1" in caplog.text
    assert "gallery sync rejected" not in caplog.text


def test_reordered_deltas_applied_in_order(synced: Agent, server: Server,
                                           raw: RawClient) -> None:
    deltas = [
        forge(server.key, version=v, base=v - 1,
              identities=[(f"person-{v}", "P", "add", unit_rows(1, v))])
        for v in (2, 3, 4)
    ]
    # The manifest of version 4 lists all three deltas; the chunks arrive backwards.
    body_deltas = []
    for forged in deltas:
        body = json.loads(json.loads(forged.manifest)["manifest"])
        body_deltas += body["deltas"]
    body["deltas"] = body_deltas
    body["snapshot"] = json.loads(json.loads(forge(server.key, version=1).manifest)
                                  ["manifest"])["snapshot"]
    manifest = sign_manifest(body, server.key)

    for forged in reversed(deltas):
        for topic, chunk in forged.chunks.items():
            raw.publish(topic, chunk, retain=True)
    raw.publish(manifest_topic(PREFIX, GROUP), manifest, retain=True)

    assert wait_until(lambda: synced.gallery.version == 4)
    assert set(gallery_rows(synced.gallery.path)[1]) == {"forged-1", "person-2", "person-3",
                                                         "person-4"}


def test_missing_delta_requests_resync(synced: Agent, server: Server, raw: RawClient,
                                       mqtt_broker: MosquittoBroker,
                                       caplog: pytest.LogCaptureFixture) -> None:
    requests = mqtt_broker.subscriber(resync_topic(PREFIX, GROUP))
    deltas = [forge(server.key, version=v, base=v - 1,
                    identities=[(f"p{v}", "P", "add", unit_rows(1, v))]) for v in (2, 3)]
    body = json.loads(json.loads(deltas[1].manifest)["manifest"])
    body["deltas"] = [json.loads(json.loads(d.manifest)["manifest"])["deltas"][0]
                      for d in deltas]
    body["snapshot"] = json.loads(json.loads(forge(server.key, version=1).manifest)
                                  ["manifest"])["snapshot"]
    for topic, chunk in deltas[1].chunks.items():  # delta 2 never comes
        raw.publish(topic, chunk)
    raw.publish(manifest_topic(PREFIX, GROUP), sign_manifest(body, server.key), retain=True)

    request = json.loads(requests.wait_for(1, timeout=TIMEOUT_S)[0].payload)

    assert request["device_id"] == "gate-01"
    assert request["applied_version"] == 1
    assert request["manifest_version"] == 3
    assert "requesting a resync" in caplog.text
    assert gallery_rows(synced.gallery.path) == (1, {"forged-1": 2})
    for topic, chunk in deltas[0].chunks.items():
        raw.publish(topic, chunk, retain=True)
    assert wait_until(lambda: synced.gallery.version == 3)


def test_manifest_for_other_group_ignored(synced: Agent, server: Server, raw: RawClient,
                                          caplog: pytest.LogCaptureFixture) -> None:
    def other_group(body: dict) -> None:
        body["group"] = "elsewhere"

    forged = forge(server.key, version=2, base=1, body_edit=other_group)
    raw.publish(manifest_topic(PREFIX, GROUP), forged.manifest, retain=True)

    assert_unchanged_and_alive(synced, server, raw, caplog, "wrong_group")


def test_snapshot_over_limit_rejected(server: Server, make_agent: Callable[..., Agent],
                                      raw: RawClient, caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(max_snapshot_bytes=1024)
    send(raw, forge(server.key, version=1, rows=unit_rows(40, 1)))

    assert wait_until(lambda: "gallery sync rejected (oversized)" in caplog.text)
    assert agent.gallery.version == 0


def test_local_gallery_not_overwritten(server: Server, make_agent: Callable[..., Agent],
                                       raw: RawClient, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "local.db"
    local = Gallery(path, MODEL, SIZE)
    local.add("kept", "Kept", unit_rows(1, 1), ["photo.jpg"])
    local.close()
    agent = make_agent(path)

    send(raw, forge(server.key, version=5))

    assert wait_until(lambda: "contains local enrolments" in caplog.text)
    assert gallery_rows(path) == (1, {"kept": 1})
    assert agent.gallery.version == 1


def test_digest_of_forged_chunk_matches(server: Server) -> None:
    forged = forge(server.key, version=1)
    manifest = parse_manifest(forged.manifest, bytes(server.key.verify_key))

    digests = [hashlib.sha256(c).hexdigest() for c in forged.chunks.values()]

    assert list(manifest.snapshot.chunks) == digests


# Large objects: digest lists, the manifest size limit, resuming a snapshot


def published_manifest(server: Server) -> Any:
    return parse_manifest(server.store.group_info(GROUP).manifest or b"",
                          bytes(server.key.verify_key))


def test_digest_lists_reach_agent(server: Server, make_agent: Callable[..., Agent],
                                  caplog: pytest.LogCaptureFixture) -> None:
    server.enrol(600)  # about 80 KB: 79 chunks of 1 KB, more than INLINE_CHUNKS_MAX
    server.publisher.publish_group(GROUP)
    agent = make_agent()
    assert wait_until(lambda: agent.gallery.version == 1)

    server.store.put_identities(GROUP, [(f"late-{i:04d}", "Late", unit_rows(2, 1000 + i),
                                         ["late"] * 2) for i in range(550)])
    server.publisher.publish_group(GROUP)
    manifest = published_manifest(server)

    assert manifest.snapshot.digest_chunks
    assert not manifest.snapshot.chunks
    assert manifest.delta(2) is not None
    assert manifest.delta(2).digest_chunks  # type: ignore[union-attr]
    assert wait_until(lambda: agent.gallery.version == 2)
    assert agent.gallery.identity_count == 1150
    assert "gallery sync rejected" not in caplog.text


def test_forged_digest_list_rejected(synced: Agent, server: Server, raw: RawClient,
                                     caplog: pytest.LogCaptureFixture) -> None:
    forged = forge(server.key, version=2, base=1, digest_list=True,
                   identities=[(f"p{i}", "P", "add", unit_rows(1, i)) for i in range(80)])
    list_topic = digest_chunk_topic(PREFIX, GROUP, "delta", 2, 0)
    good_list = forged.chunks[list_topic]
    raw.publish(list_topic, bytes([good_list[0] ^ 1]) + good_list[1:])
    for topic, chunk in forged.chunks.items():
        if topic != list_topic:
            raw.publish(topic, chunk)
    raw.publish(manifest_topic(PREFIX, GROUP), forged.manifest, retain=True)

    assert wait_until(lambda: "gallery sync rejected (digest)" in caplog.text)
    assert "digest-list chunk 0" in caplog.text
    assert synced.sync.wait_idle(TIMEOUT_S)
    assert gallery_rows(synced.gallery.path) == (1, {"forged-1": 2})
    raw.publish(list_topic, good_list)
    assert wait_until(lambda: synced.gallery.version == 2)
    assert synced.gallery.identity_count == 81


def test_million_identity_manifest_fits(server: Server) -> None:
    chunk_bytes = 128 * 1024
    size = 1_000_000 * (128 * 4 + 70)  # rows and header of a 1M-identity snapshot, in bytes
    count = -(-size // chunk_bytes)
    inline = replace(
        describe_object("snapshot", b"x" * 64, version=40, base_version=None,
                        chunk_bytes=chunk_bytes, identities=1_000_000, embeddings=1_000_000),
        size=size, chunk_count=count,
        chunks=tuple(hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)))
    listed, digest_list = with_digest_list(inline, chunk_bytes)
    body = {
        "schema": 1, "group": GROUP, "version": 40, "model_id": MODEL, "embedding_size": 128,
        "metric": "euclidean", "chunk_bytes": chunk_bytes,
        "published_at": "2026-01-01T00:00:00.000+00:00",
        "snapshot": object_entry(inline), "deltas": [],
    }
    inline_message = sign_manifest(body, server.key)
    body["snapshot"] = object_entry(listed)
    listed_message = sign_manifest(body, server.key)

    assert len(inline_message) > chunk_bytes  # the problem: 4,300 digests inline
    assert len(listed_message) < 4096
    assert len(listed.digest_chunks) == 2
    assert len(digest_list) == count * 32
    parsed = parse_manifest(listed_message, bytes(server.key.verify_key))
    assert parsed.snapshot.chunk_count == count
    assert parsed.snapshot.digest_chunks == listed.digest_chunks


def test_old_deltas_leave_large_manifest(server: Server,
                                         make_agent: Callable[..., Agent]) -> None:
    server.publisher.settings = replace(server.publisher.settings, max_deltas=32,
                                        max_manifest_bytes=4096)
    server.enrol(200)
    server.publisher.publish_group(GROUP)
    behind = make_agent()
    assert wait_until(lambda: behind.gallery.version == 1)
    behind.sync.stop()
    behind.client.stop(timeout_s=0.5)
    behind.gallery.close()
    for version in range(2, 22):
        server.store.put_identity(GROUP, f"extra-{version}", "x", unit_rows(1, version), ["x"])
        server.publisher.publish_group(GROUP)
    message = server.store.group_info(GROUP).manifest or b""
    manifest = published_manifest(server)

    assert len(message) <= 4096
    assert manifest.version == 21
    assert manifest.snapshot.version > 1  # added when the deltas outgrew the manifest
    assert manifest.deltas
    assert manifest.deltas[0].base_version is not None
    assert manifest.deltas[0].base_version > 1
    assert manifest.deltas[-1].version == 21
    restarted = make_agent()
    assert wait_until(lambda: restarted.gallery.version == 21)
    assert restarted.gallery.identity_count == 220


def test_manifest_over_limit_not_published(server: Server) -> None:
    from agent.server.publisher import PublishError

    server.publisher.settings = replace(server.publisher.settings, max_manifest_bytes=4096)
    server.enrol(20_000, per_identity=1)  # about 1.5 MB: a digest list of 46 chunks

    with pytest.raises(PublishError, match="publish.max_manifest_bytes 4096"):
        server.publisher.publish_group(GROUP)
    assert server.store.group_info(GROUP).version == 0


def test_snapshot_resumes_after_restart(server: Server, make_agent: Callable[..., Agent],
                                        raw: RawClient, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent.gallery_sync")
    server.enrol(800)  # about 105 chunks, so the digests travel in a digest list
    publication = server.publisher.prepare(GROUP)
    assert publication is not None
    snapshot = publication.manifest.snapshot
    assert snapshot.digest_chunks
    data = publication.new_objects[("snapshot", 1)]
    _, digest_list = with_digest_list(describe_object(
        "snapshot", data, version=1, base_version=None, chunk_bytes=1024,
        identities=snapshot.identities, embeddings=snapshot.embeddings), 1024)
    half = snapshot.chunk_count // 2
    first = make_agent()
    for index, chunk in enumerate(split_chunks(digest_list, 1024)):
        raw.publish(digest_chunk_topic(PREFIX, GROUP, "snapshot", 1, index), chunk, retain=True)
    for index, chunk in enumerate(split_chunks(data, 1024)[:half]):
        raw.publish(chunk_topic(PREFIX, GROUP, "snapshot", 1, index), chunk, retain=True)
    raw.publish(manifest_topic(PREFIX, GROUP), server.store.group_info(GROUP).manifest or b"",
                retain=True)
    assert wait_until(lambda: len(getattr(first.sync._transfers.get(("snapshot", 1)),
                                          "received", ())) == half)
    first.sync.stop()
    first.client.stop(timeout_s=0.5)
    first.gallery.close()

    # The first half is gone from the broker: only the spool file still has it.
    for index in range(half):
        raw.publish(chunk_topic(PREFIX, GROUP, "snapshot", 1, index), b"", retain=True)
    for index, chunk in enumerate(split_chunks(data, 1024)[half:], start=half):
        raw.publish(chunk_topic(PREFIX, GROUP, "snapshot", 1, index), chunk, retain=True)
    second = make_agent()

    assert wait_until(lambda: second.gallery.version == 1)
    assert f"resuming snapshot 1 with {half} of {snapshot.chunk_count} chunks" in caplog.text
    assert second.gallery.identity_count == 800
    assert not list(tmp_path.glob("gallery.db.snapshot-*.part"))
