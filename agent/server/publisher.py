"""Publish a group's gallery: signed versions, snapshots and deltas, retained on the broker.

Each publication compares the store's identities with the digests recorded at
the last publication. Any difference becomes version N + 1: a delta from N, and
also a new snapshot when the first version, a forced one, too many deltas or
too many delta bytes call for it. The store commits the version, its objects
and its manifest in one transaction before anything is sent. A crash between
the commit and the publish is repaired by the next start, which republishes
the stored version.

Retained messages keep the newest state on the broker: the manifest, every
chunk of the objects it lists, and nothing older. A device that asks on the
resync topic gets a snapshot at the current version again, at most once per
`resync_min_interval_s` per group.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import PublishConfig
from agent.gallery_protocol import (
    INLINE_CHUNKS_MAX,
    SCHEMA_VERSION,
    Manifest,
    ObjectInfo,
    chunk_topic,
    describe_object,
    digest_chunk_topic,
    encode_digest_list,
    encode_object,
    manifest_topic,
    object_entry,
    parse_manifest,
    resync_topic,
    sign_manifest,
    split_chunks,
    with_digest_list,
)
from agent.server.client import ServerClient, describe
from agent.server.store import GroupInfo, ServerStore, StoredIdentity

log = logging.getLogger(__name__)

DELIVERY_TIMEOUT_S = 300.0
MAX_RESYNC_REQUEST_BYTES = 4096


def load_signing_key(path: Path) -> Any:
    """Read the base64 Ed25519 seed that `server keygen` wrote; return a nacl SigningKey."""
    import base64

    from nacl.signing import SigningKey

    try:
        seed = base64.b64decode(path.read_text(encoding="ascii").strip(), validate=True)
    except OSError as exc:
        raise ValueError(f"cannot read the signing key {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ValueError(f"signing key {path} is not base64 text: {exc}") from exc
    if len(seed) != 32:
        raise ValueError(f"signing key {path} must hold a base64 32-byte Ed25519 seed")
    return SigningKey(seed)


def write_key_pair(directory: Path) -> tuple[Path, Path]:
    """Write a new server.key (mode 0600) and server.pub into `directory`."""
    import base64
    import os

    from nacl.signing import SigningKey

    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / "server.key", directory / "server.pub"
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists; move it away to make a new key")
    key = SigningKey.generate()
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(base64.b64encode(bytes(key)).decode("ascii") + "\n")
    public_path.write_text(base64.b64encode(bytes(key.verify_key)).decode("ascii") + "\n",
                           encoding="ascii")
    return private_path, public_path


@dataclass(frozen=True)
class Publication:
    """Result of one call to `publish_group`."""

    group: str
    version: int
    manifest: Manifest
    new_objects: dict[tuple[str, int], bytes]
    dropped: tuple[ObjectInfo, ...]  # objects of the previous manifest no longer listed


class PublishError(RuntimeError):
    """A version that cannot be published with these settings; the message names the fix."""


class GalleryPublisher:
    """Builds signed versions from the store and publishes them; see the module docstring."""

    def __init__(self, store: ServerStore, client: ServerClient, signing_key: Any,
                 topic_prefix: str, settings: PublishConfig) -> None:
        self.store = store
        self.client = client
        self.signing_key = signing_key
        self.public_key = bytes(signing_key.verify_key)
        self.prefix = topic_prefix
        self.settings = settings
        self._requests: queue.Queue[tuple[str, str]] = queue.Queue(1000)
        self._last_resync: dict[str, float] = {}

    # Building versions

    def prepare(self, group: str, force_snapshot: bool = False) -> Publication | None:
        """Commit the next version of `group` to the store; None when nothing changed.

        A version that needs no new snapshot reads only the identity digests and
        the embeddings of the changed identities, so a small delta stays cheap in a
        large group. A snapshot and the delta beside it come from one read of
        every identity, so that both describe the same gallery.
        """
        info = self.store.group_info(group)
        previous = self._stored_manifest(group)
        if previous is not None and not force_snapshot:
            was_published, removed = self.store.unpublished_changes(group)
            if not was_published and not removed:
                return None
            changed = self.store.identities(group, sorted(was_published))
            published = {i.identity_id for i in changed if was_published[i.identity_id]}
            publication = self._commit_version(info, previous, published, changed, removed,
                                               current=None, force_snapshot=False)
            if publication is not None:
                return publication

        digests = self.store.published_digests(group)
        current = self.store.identities(group)
        changed = [i for i in current if digests.get(i.identity_id) != i.digest]
        removed = sorted(set(digests) - {i.identity_id for i in current})
        if not changed and not removed and previous is not None and not force_snapshot:
            return None
        return self._commit_version(info, previous, set(digests), changed, removed,
                                    current=current, force_snapshot=force_snapshot)

    def _commit_version(self, info: GroupInfo, previous: Manifest | None,
                        published: set[str], changed: list[StoredIdentity],
                        removed: list[str], current: list[StoredIdentity] | None,
                        force_snapshot: bool) -> Publication | None:
        """Build, sign and commit the next version from the changed and removed identities.

        `current` is every identity of the group, needed for a snapshot. Without
        it, returns None when the version needs a snapshot.
        """
        group = info.group
        changes = _delta_changes(changed, published, removed, info.embedding_size)
        version = info.version + 1 if changes or previous is None else info.version
        objects: dict[tuple[str, int], bytes] = {}
        deltas = list(previous.deltas) if previous is not None else []
        if changes and previous is not None:
            data = encode_object("delta", group=group, version=version,
                                 base_version=info.version, model_id=info.model_id,
                                 embedding_size=info.embedding_size, changes=changes)
            deltas.append(self._describe(
                "delta", data, version=version, base_version=info.version,
                identities=len(changes), embeddings=sum(len(c[3]) for c in changes)))
            objects[("delta", version)] = data

        snapshot = previous.snapshot if previous is not None else None
        new_snapshot = snapshot is None or force_snapshot or self._needs_snapshot(snapshot,
                                                                                 deltas)
        while True:
            if new_snapshot:
                if current is None:
                    return None
                data = encode_object(
                    "snapshot", group=group, version=version, base_version=None,
                    model_id=info.model_id, embedding_size=info.embedding_size,
                    changes=[(i.identity_id, i.name, "add", i.vectors) for i in current])
                snapshot = self._describe(
                    "snapshot", data, version=version, base_version=None,
                    identities=len(current), embeddings=sum(len(i.vectors) for i in current))
                objects[("snapshot", version)] = data
                deltas = self._trim_deltas(deltas, snapshot)
            assert snapshot is not None
            body = {
                "schema": SCHEMA_VERSION,
                "group": group,
                "version": version,
                "model_id": info.model_id,
                "embedding_size": info.embedding_size,
                "metric": info.metric,
                "chunk_bytes": self.settings.chunk_bytes,
                "published_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "snapshot": object_entry(snapshot),
                "deltas": [object_entry(d) for d in deltas],
            }
            message = self._sign_within_limit(body, snapshot)
            if message is not None:
                break
            if new_snapshot:
                raise PublishError(
                    f"group {group}: the manifest of version {version} has more than "
                    f"publish.max_manifest_bytes {self.settings.max_manifest_bytes} bytes even "
                    "with the snapshot alone; raise publish.chunk_bytes (fewer chunks to list) "
                    "or publish.max_manifest_bytes")
            # Deltas after the snapshot cannot leave the manifest, so a new
            # snapshot at this version makes them all optional.
            log.info("group %s: manifest of version %d over publish.max_manifest_bytes; "
                     "adding a snapshot", group, version)
            new_snapshot = True

        manifest = parse_manifest(message, self.public_key)
        keep = {(o.kind, o.version) for o in manifest.objects()}
        # A new delta can leave at once when its version also has a new snapshot.
        objects = {key: data for key, data in objects.items() if key in keep}
        digest_changes: dict[str, str | None] = {i.identity_id: i.digest for i in changed}
        digest_changes.update(dict.fromkeys(removed))
        self.store.commit_publication(group, version, message, digest_changes, objects, keep)
        dropped = tuple(o for o in (previous.objects() if previous else ())
                        if (o.kind, o.version) not in keep)
        log.info("group %s: committed version %d (%d identities changed, snapshot %d, "
                 "%d deltas)", group, version, len(changes), snapshot.version,
                 len(manifest.deltas))
        return Publication(group, version, manifest, objects, dropped)

    def _describe(self, kind: str, data: bytes, **fields: Any) -> ObjectInfo:
        """Describe a new object, moving its chunk digests to a digest list when there are many."""
        info = describe_object(kind, data, chunk_bytes=self.settings.chunk_bytes, **fields)
        if info.chunk_count > INLINE_CHUNKS_MAX:
            info, _ = with_digest_list(info, self.settings.chunk_bytes)
        return info

    def _sign_within_limit(self, body: dict[str, Any], snapshot: ObjectInfo) -> bytes | None:
        """Sign the manifest, dropping deltas older than the snapshot while it is too large.

        Devices that needed a dropped delta take the snapshot instead. Returns None
        when the manifest is still over publish.max_manifest_bytes.
        """
        limit = self.settings.max_manifest_bytes
        message = sign_manifest(body, self.signing_key)
        while len(message) > limit and body["deltas"] \
                and body["deltas"][0]["version"] <= snapshot.version:
            dropped = body["deltas"].pop(0)
            log.info("group %s: delta %d left the manifest to keep it under "
                     "publish.max_manifest_bytes %d", body["group"], dropped["version"], limit)
            message = sign_manifest(body, self.signing_key)
        return message if len(message) <= limit else None

    def _needs_snapshot(self, snapshot: ObjectInfo, deltas: list[ObjectInfo]) -> bool:
        since = [d for d in deltas if d.version > snapshot.version]
        return (len(since) > self.settings.max_deltas
                or sum(d.size for d in since) > snapshot.size // 2)

    def _trim_deltas(self, deltas: list[ObjectInfo], snapshot: ObjectInfo) -> list[ObjectInfo]:
        """Keep the newest deltas that stay cheaper than the snapshot, for devices just behind."""
        kept: list[ObjectInfo] = []
        total = 0
        for delta in reversed(deltas):
            if len(kept) >= self.settings.max_deltas or total + delta.size > snapshot.size // 2:
                break
            kept.append(delta)
            total += delta.size
        return list(reversed(kept))

    def _stored_manifest(self, group: str) -> Manifest | None:
        message = self.store.group_info(group).manifest
        return parse_manifest(message, self.public_key) if message else None

    # Sending

    def publish_group(self, group: str, force_snapshot: bool = False) -> int | None:
        """Commit and send the next version; returns it, or None when nothing changed."""
        publication = self.prepare(group, force_snapshot)
        if publication is None:
            # DEBUG, because `serve` polls every publish.poll_interval_s.
            log.debug("group %s: nothing changed since version %d", group,
                      self.store.group_info(group).version)
            return None
        self.send(publication.manifest, publication.new_objects, publication.dropped)
        return publication.version

    def send(self, manifest: Manifest, objects: dict[tuple[str, int], bytes],
             dropped: tuple[ObjectInfo, ...] = ()) -> None:
        """Publish the objects' chunks, then the manifest, then clear dropped objects.

        An object whose manifest entry names a digest list gets that list's chunks first.
        """
        group = manifest.group
        listed = {(o.kind, o.version): o for o in manifest.objects()}
        started = time.monotonic()
        chunks = 0
        for (kind, version), data in sorted(objects.items(), key=lambda item: item[0][1]):
            parts = split_chunks(data, manifest.chunk_bytes)
            info = listed[(kind, version)]
            if info.digest_chunks:
                digest_list = encode_digest_list(
                    [hashlib.sha256(part).hexdigest() for part in parts])
                for index, chunk in enumerate(split_chunks(digest_list, manifest.chunk_bytes)):
                    if hashlib.sha256(chunk).hexdigest() != info.digest_chunks[index]:
                        raise PublishError(f"group {group}: {kind} {version} in the store does "
                                           "not match its signed digest list")
                    self.client.publish(digest_chunk_topic(self.prefix, group, kind, version,
                                                           index), chunk, retain=True)
                    chunks += 1
            for index, chunk in enumerate(parts):
                self.client.publish(chunk_topic(self.prefix, group, kind, version, index), chunk,
                                    retain=True)
                chunks += 1
        message = self.store.group_info(group).manifest
        assert message is not None
        self.client.publish(manifest_topic(self.prefix, group), message, retain=True)
        for info in dropped:
            for index in range(info.chunk_count):
                self.client.publish(chunk_topic(self.prefix, group, info.kind, info.version,
                                                index), b"", retain=True)
            for index in range(len(info.digest_chunks)):
                self.client.publish(digest_chunk_topic(self.prefix, group, info.kind,
                                                       info.version, index), b"", retain=True)
        if not self.client.wait_for_delivery(DELIVERY_TIMEOUT_S):
            log.warning("group %s: %d messages of version %d still without PUBACK after %.0f s",
                        group, self.client.pending_count, manifest.version, DELIVERY_TIMEOUT_S)
            return
        log.info("group %s: published version %d: %d chunks, manifest, %d objects cleared, "
                 "in %.2f s", group, manifest.version, chunks, len(dropped),
                 time.monotonic() - started)

    def republish(self, group: str, include_snapshot: bool) -> None:
        """Send the stored version again, for a broker that lost its retained messages."""
        manifest = self._stored_manifest(group)
        if manifest is None:
            return
        stored = self.store.published_objects(group)
        wanted = [o for o in manifest.objects() if include_snapshot or o.kind == "delta"]
        objects = {(o.kind, o.version): stored[(o.kind, o.version)] for o in wanted}
        self.send(manifest, objects)

    # Serving devices

    def serve(self, stop: threading.Event) -> None:
        """Publish changes and serve resync requests until `stop` is set."""
        groups = self.settings.groups
        for group in groups:
            self.client.subscribe(resync_topic(self.prefix, group), self._on_resync)
        reconnects = threading.Event()
        self.client.on_connected(reconnects.set)
        next_poll = 0.0
        while not stop.is_set():
            if reconnects.is_set():
                reconnects.clear()
                for group in groups:
                    self._guarded(group, "republish", lambda g: self.republish(g, False))
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.settings.poll_interval_s
                for group in groups:
                    self._guarded(group, "publish", self.publish_group)
            try:
                group, requester = self._requests.get(timeout=0.1)
            except queue.Empty:
                continue
            self._guarded(group, "resync", lambda g, r=requester: self._answer_resync(g, r))

    def _guarded(self, group: str, action: str, work: Any) -> None:
        try:
            work(group)
        except Exception:
            log.exception("group %s: %s failed; retrying at the next poll", group, action)

    def _on_resync(self, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        group = parts[-2] if len(parts) >= 2 else ""
        if group not in self.settings.groups:
            return
        payload = bytes(message.payload)
        requester = "unknown device"
        if len(payload) <= MAX_RESYNC_REQUEST_BYTES:
            try:
                request = json.loads(payload)
                requester = str(request.get("device_id"))[:64] if isinstance(request, dict) \
                    else requester
            except ValueError:
                log.warning("group %s: resync request mid %d is not JSON: %s", group,
                            message.mid, describe(payload))
        try:
            self._requests.put_nowait((group, requester))
        except queue.Full:
            log.warning("group %s: resync request from %s dropped, %d requests wait", group,
                        requester, self._requests.qsize())

    def _answer_resync(self, group: str, requester: str) -> None:
        now = time.monotonic()
        if now - self._last_resync.get(group, -1e9) < self.settings.resync_min_interval_s:
            log.debug("group %s: resync request from %s within %.0f s of the last one; skipped",
                      group, requester, self.settings.resync_min_interval_s)
            return
        self._last_resync[group] = now
        manifest = self._stored_manifest(group)
        log.info("group %s: device %s asked for a resync; republishing version %s", group,
                 requester, manifest.version if manifest else None)
        if manifest is not None and manifest.snapshot.version < manifest.version:
            publication = self.prepare(group, force_snapshot=True)
            if publication is not None:
                self.send(publication.manifest, publication.new_objects, publication.dropped)
                stored = self.store.published_objects(group)
                deltas = {(o.kind, o.version): stored[(o.kind, o.version)]
                          for o in publication.manifest.deltas}
                self.send(publication.manifest, deltas)
                return
        self.republish(group, include_snapshot=True)


def _delta_changes(changed: list[StoredIdentity], published: set[str],
                   removed: list[str], embedding_size: int) -> list[tuple[str, str, str, Any]]:
    """Return the delta operations for the changed and removed identities.

    `published` contains the ids of changed identities that devices already have.
    """
    import numpy as np

    changes: list[tuple[str, str, str, Any]] = [
        (i.identity_id, i.name, "update" if i.identity_id in published else "add", i.vectors)
        for i in changed
    ]
    no_rows = np.empty((0, embedding_size), dtype=np.float32)
    changes += [(identity_id, "", "remove", no_rows) for identity_id in removed]
    return changes
