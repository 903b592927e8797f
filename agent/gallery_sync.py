"""Agent side of gallery sync: follow one server group's signed manifest over MQTT.

The run loop calls `start_gallery_sync` once the MQTT client exists and
`GallerySync.stop` before it closes the gallery. Messages arrive in paho's
network thread, which only queues them. One worker thread checks, stores and
applies them, so a large snapshot never blocks keep-alives or PUBACKs, and an
error on a message is logged and never reaches the network thread.

The worker keeps the gallery at the last good version. It applies a snapshot or
a delta only after the signed manifest vouches for every byte of it, and each
in one SQLite transaction (agent/gallery.py), so a crash leaves the old version
or the new one. docs/protocol.md describes the messages and the rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from agent.config import Config, SyncConfig
from agent.gallery import Gallery, GalleryError
from agent.gallery_protocol import (
    Manifest,
    ObjectInfo,
    ProtocolError,
    decode_object,
    decode_public_key,
    group_topic,
    manifest_topic,
    parse_chunk_topic,
    parse_manifest,
    resync_topic,
)
from agent.models.manifest import Manifest as ModelManifest

log = logging.getLogger(__name__)

LOG_PAYLOAD_BYTES = 64
# Messages waiting for the worker. A full queue makes the network thread wait
# up to QUEUE_PUT_TIMEOUT_S and then drop the message, which the fetch timeout
# later recovers with a resync request.
QUEUE_MESSAGES = 64
QUEUE_PUT_TIMEOUT_S = 5.0
# Delta chunks that arrive before the manifest that lists them are kept, up to
# this many bytes, until that manifest comes.
UNVERIFIED_BYTES = 8 * 1024 * 1024
REJECT_LOG_INTERVAL_S = 1.0


class Message(Protocol):
    topic: str
    payload: bytes
    mid: int


class Publisher(Protocol):
    """The part of agent.mqtt.MqttPublisher that sync uses."""

    def subscribe(self, topic: str, callback: Any, qos: int = 1) -> None: ...
    def unsubscribe(self, topic: str) -> None: ...
    def publish(self, topic: str, payload: bytes) -> Any: ...
    def update_status(self, **fields: Any) -> None: ...


def preview(payload: bytes) -> str:
    """A payload cut to LOG_PAYLOAD_BYTES for a log line."""
    if len(payload) <= LOG_PAYLOAD_BYTES:
        return repr(payload)
    return f"{payload[:LOG_PAYLOAD_BYTES]!r}... ({len(payload)} bytes)"


@dataclass
class _Transfer:
    """One snapshot or delta being collected chunk by chunk."""

    info: ObjectInfo
    chunk_bytes: int
    received: set[int] = field(default_factory=set)
    parts: dict[int, bytes] = field(default_factory=dict)  # deltas, in memory
    spool_path: Path | None = None  # snapshots, on disk beside the gallery
    spool: BinaryIO | None = None

    @property
    def complete(self) -> bool:
        return len(self.received) == self.info.chunk_count

    def store(self, index: int, payload: bytes) -> None:
        if self.spool is not None:
            self.spool.seek(index * self.chunk_bytes)
            self.spool.write(payload)
        else:
            self.parts[index] = payload
        self.received.add(index)

    def read(self) -> bytes:
        if self.spool is None:
            return b"".join(self.parts[i] for i in range(self.info.chunk_count))
        self.spool.flush()
        self.spool.seek(0)
        return self.spool.read()

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.spool_path is not None:
            self.spool_path.unlink(missing_ok=True)
        self.parts.clear()


class _RejectLog:
    """Log each rejection at WARNING, at most once per second per reason; count the rest."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, text: str, *args: Any) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) < REJECT_LOG_INTERVAL_S:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            log.debug("gallery sync rejected (%s): %s", reason, text % args)
            return
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        suffix = f" ({suppressed} more like it not logged)" if suppressed else ""
        log.warning("gallery sync rejected (%s): %s%s", reason, text % args, suffix)


class GallerySync:
    """Keeps a Gallery equal to the newest signed version of one server group."""

    def __init__(
        self,
        *,
        gallery: Gallery,
        publisher: Publisher,
        device_id: str,
        topic_prefix: str,
        settings: SyncConfig,
        model_id: str,
        embedding_size: int,
        metric: str,
    ) -> None:
        self.gallery = gallery
        self.publisher = publisher
        self.device_id = device_id
        self.prefix = topic_prefix
        self.group = settings.group
        self.settings = settings
        self.model_id = model_id
        self.embedding_size = embedding_size
        self.metric = metric
        self._public_key = decode_public_key(settings.public_key)

        self._queue: queue.Queue[tuple[str, bytes, int] | None] = queue.Queue(QUEUE_MESSAGES)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.rejected = _RejectLog()
        # Worker-thread state below.
        self._target: Manifest | None = None
        self._target_text_sha256 = ""
        self._transfers: dict[tuple[str, int], _Transfer] = {}
        # (kind, version, chunk index, sha256) -> payload. The digest is part of
        # the key, so a forged chunk cannot hide a good one on the same topic.
        self._unverified: OrderedDict[tuple[str, int, int, str], bytes] = OrderedDict()
        self._unverified_bytes = 0
        self._snapshot_filter: str | None = None
        self._last_progress = time.monotonic()
        self._last_resync = -1e9
        # Set when a delta did not apply, so the next plan takes the snapshot.
        self._force_snapshot = False
        self._idle = threading.Condition()
        self._busy = False

    # Lifecycle

    def start(self) -> None:
        """Subscribe to the group's manifest and deltas and start the worker thread."""
        self._discard_stale_spools()
        self._thread = threading.Thread(target=self._run, name="gallery-sync", daemon=True)
        self._thread.start()
        self.publisher.update_status(gallery_version=self.gallery.version,
                                     gallery_group=self.group)
        self.publisher.subscribe(manifest_topic(self.prefix, self.group), self._on_message)
        self.publisher.subscribe(f"{group_topic(self.prefix, self.group)}/delta/#",
                                 self._on_message)
        log.info("gallery sync %s: started for group %s at version %d (server key %s)",
                 self.device_id, self.group, self.gallery.version,
                 hashlib.sha256(self._public_key).hexdigest()[:16])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker; an apply in progress finishes or is rolled back by SQLite."""
        if self._thread is None:
            return
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("gallery sync %s: worker still busy after %.0f s at stop",
                        self.device_id, timeout_s)
        for transfer in self._transfers.values():
            transfer.discard()
        self._transfers.clear()
        log.info("gallery sync %s: stopped at version %d", self.device_id, self.gallery.version)

    def wait_for_version(self, timeout_s: float) -> bool:
        """Block until the gallery has a synced version (1 or more); False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.gallery.version == 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return False
            with self._idle:
                self._idle.wait(min(remaining, 0.1))
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every queued message has been handled; for tests and benchmarks."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            return self._idle.wait_for(
                lambda: self._queue.empty() and not self._busy,
                timeout=max(deadline - time.monotonic(), 0.0),
            )

    # Network thread

    def _on_message(self, message: Message) -> None:
        payload = bytes(message.payload)
        if len(payload) > self.settings.max_message_bytes:
            self.rejected("oversized", "message mid %d on %s has %d bytes, more than "
                          "sync.max_message_bytes %d", message.mid, message.topic, len(payload),
                          self.settings.max_message_bytes)
            return
        try:
            self._queue.put((message.topic, payload, message.mid), timeout=QUEUE_PUT_TIMEOUT_S)
        except queue.Full:
            self.rejected("queue_full", "message mid %d on %s dropped: the sync worker is %d "
                          "messages behind", message.mid, message.topic, QUEUE_MESSAGES)

    # Worker thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is not None:
                with self._idle:
                    self._busy = True
                try:
                    self._handle(*item)
                except Exception:
                    log.exception("gallery sync %s: handling message mid %d on %s failed; the "
                                  "gallery stays at version %d", self.device_id, item[2],
                                  item[0], self.gallery.version)
            try:
                self._check_progress()
            except Exception:
                log.exception("gallery sync %s: progress check failed", self.device_id)
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    def _handle(self, topic: str, payload: bytes, mid: int) -> None:
        if topic == manifest_topic(self.prefix, self.group):
            self._handle_manifest(payload, mid)
            return
        try:
            kind, version, index = parse_chunk_topic(self.prefix, self.group, topic)
        except ProtocolError as exc:
            self.rejected(exc.reason, "message mid %d: %s", mid, exc)
            return
        self._handle_chunk(kind, version, index, payload, mid, topic)

    def _handle_manifest(self, payload: bytes, mid: int) -> None:
        if not payload:
            log.info("gallery sync %s: manifest of group %s was cleared (mid %d); keeping "
                     "version %d", self.device_id, self.group, mid, self.gallery.version)
            return
        try:
            manifest = parse_manifest(payload, self._public_key)
            self._check_manifest(manifest)
        except ProtocolError as exc:
            self.rejected(exc.reason, "manifest mid %d: %s; payload %s", mid, exc,
                          preview(payload))
            return

        applied = self.gallery.version
        text_sha256 = hashlib.sha256(payload).hexdigest()
        if manifest.version < applied:
            self.rejected("rollback", "manifest mid %d: version %d is older than the applied "
                          "version %d", mid, manifest.version, applied)
            return
        if manifest.version == applied:
            log.debug("gallery sync %s: manifest mid %d repeats applied version %d; ignored",
                      self.device_id, mid, applied)
            self._finish_target()
            return
        target = self._target
        if target is not None and manifest.version < target.version:
            self.rejected("stale", "manifest mid %d: version %d is older than version %d, "
                          "which is being fetched", mid, manifest.version, target.version)
            return
        if target is not None and text_sha256 == self._target_text_sha256:
            log.debug("gallery sync %s: manifest mid %d for version %d is a duplicate; ignored",
                      self.device_id, mid, manifest.version)
            return

        log.info("gallery sync %s: manifest for version %d (snapshot %d, %d deltas, mid %d); "
                 "applied version %d", self.device_id, manifest.version,
                 manifest.snapshot.version, len(manifest.deltas), mid, applied)
        self._target = manifest
        self._target_text_sha256 = text_sha256
        self._plan()

    def _check_manifest(self, manifest: Manifest) -> None:
        expected = (
            ("wrong_group", "group", manifest.group, self.group),
            ("wrong_model", "model id", manifest.model_id, self.model_id),
            ("wrong_embedding_size", "embedding size", manifest.embedding_size,
             self.embedding_size),
            ("wrong_metric", "metric", manifest.metric, self.metric),
        )
        for reason, what, stated, ours in expected:
            if stated != ours:
                raise ProtocolError(reason, f"{what} is {str(stated)[:80]!r}, this agent "
                                            f"needs {ours!r}")
        if manifest.snapshot.size > self.settings.max_snapshot_bytes:
            raise ProtocolError(
                "oversized", f"snapshot {manifest.snapshot.version} has {manifest.snapshot.size} "
                f"bytes, more than sync.max_snapshot_bytes {self.settings.max_snapshot_bytes}")
        if manifest.chunk_bytes > self.settings.max_message_bytes:
            raise ProtocolError(
                "oversized", f"chunk_bytes {manifest.chunk_bytes} is more than "
                f"sync.max_message_bytes {self.settings.max_message_bytes}")

    def _plan(self) -> None:
        """Decide which objects reach the target version, and start fetching them."""
        target = self._target
        assert target is not None
        applied = self.gallery.version
        chain_start = target.deltas[0].base_version if target.deltas else target.version
        needed: list[ObjectInfo] = []
        if self._force_snapshot or chain_start is None or applied < chain_start:
            if applied < target.snapshot.version:
                needed.append(target.snapshot)
            needed += [d for d in target.deltas
                       if d.version > max(applied, target.snapshot.version)]
        else:
            needed += [d for d in target.deltas if d.version > applied]

        wanted = {(info.kind, info.version): info for info in needed}
        for key in list(self._transfers):
            if key not in wanted or self._transfers[key].info != wanted[key]:
                self._transfers.pop(key).discard()
        for key, info in wanted.items():
            if key not in self._transfers:
                self._transfers[key] = self._new_transfer(info, target.chunk_bytes)

        snapshot_filter = None
        if (target.snapshot.kind, target.snapshot.version) in self._transfers:
            snapshot_filter = (f"{group_topic(self.prefix, self.group)}/snapshot/"
                               f"{target.snapshot.version}/+")
        self._set_snapshot_filter(snapshot_filter)
        self._last_progress = time.monotonic()
        for early, payload in list(self._unverified.items()):
            kind, version, index, _digest = early
            transfer = self._transfers.get((kind, version))
            if transfer is None:
                continue
            self._drop_unverified(early)
            self._store_chunk(transfer, index, payload, -1)
        self._apply_ready()

    def _new_transfer(self, info: ObjectInfo, chunk_bytes: int) -> _Transfer:
        transfer = _Transfer(info, chunk_bytes)
        if info.kind == "snapshot":
            path = self._spool_path(info.version)
            transfer.spool_path = path
            transfer.spool = path.open("w+b")
        return transfer

    def _handle_chunk(self, kind: str, version: int, index: int, payload: bytes, mid: int,
                      topic: str) -> None:
        if version <= self.gallery.version:
            log.debug("gallery sync %s: chunk %s ignored, version %d is applied",
                      self.device_id, topic, self.gallery.version)
            return
        transfer = self._transfers.get((kind, version))
        if transfer is None:
            if kind == "delta" and payload:
                digest = hashlib.sha256(payload).hexdigest()
                self._keep_unverified((kind, version, index, digest), payload)
            return
        self._store_chunk(transfer, index, payload, mid)
        self._apply_ready()

    def _store_chunk(self, transfer: _Transfer, index: int, payload: bytes, mid: int) -> None:
        info = transfer.info
        where = f"{info.kind} {info.version} chunk {index}"
        if index >= info.chunk_count:
            self.rejected("bad_chunk_index", "%s (mid %d): the manifest lists %d chunks",
                          where, mid, info.chunk_count)
            return
        if index in transfer.received:
            log.debug("gallery sync %s: %s (mid %d) is a duplicate; ignored",
                      self.device_id, where, mid)
            return
        digest = hashlib.sha256(payload).hexdigest()
        if digest != info.chunks[index]:
            reason = "truncated" if len(payload) < self._chunk_size(transfer, index) else "digest"
            self.rejected(reason, "%s (mid %d): %d bytes with sha256 %s, the signed manifest "
                          "says %s", where, mid, len(payload), digest[:16], info.chunks[index][:16])
            if info.kind == "delta":
                # A newer manifest may list it; keep it until then.
                self._keep_unverified((info.kind, info.version, index, digest), payload)
            return
        transfer.store(index, payload)
        self._last_progress = time.monotonic()

    @staticmethod
    def _chunk_size(transfer: _Transfer, index: int) -> int:
        start = index * transfer.chunk_bytes
        return min(transfer.chunk_bytes, transfer.info.size - start)

    def _apply_ready(self) -> None:
        """Apply every complete object that follows the applied version, in order."""
        target = self._target
        while target is not None:
            applied = self.gallery.version
            snapshot = self._transfers.get(("snapshot", target.snapshot.version))
            if snapshot is not None and applied < target.snapshot.version:
                if not snapshot.complete:
                    return
                self._apply(snapshot, target)
            else:
                delta = self._transfers.get(("delta", applied + 1))
                if delta is None or not delta.complete:
                    break
                self._apply(delta, target)
            if self._target is not target:
                return
        self._finish_target()

    def _apply(self, transfer: _Transfer, target: Manifest) -> None:
        info = transfer.info
        key = (info.kind, info.version)
        self._transfers.pop(key, None)
        started = time.monotonic()
        try:
            data = transfer.read()
            if hashlib.sha256(data).hexdigest() != info.sha256:
                raise ProtocolError("digest", f"{info.kind} {info.version}: every chunk matched "
                                              "but the whole object's sha256 does not")
            decoded = decode_object(data, info, target)
            if info.kind == "snapshot":
                self.gallery.apply_snapshot(self.group, info.version, decoded.changes,
                                            decoded.vectors)
            else:
                assert info.base_version is not None
                self.gallery.apply_delta(self.group, info.base_version, info.version,
                                         decoded.changes, decoded.vectors)
        except (ProtocolError, GalleryError) as exc:
            reason = exc.reason if isinstance(exc, ProtocolError) else "does_not_apply"
            self.rejected(reason, "%s %d: %s; gallery stays at version %d", info.kind,
                          info.version, exc, self.gallery.version)
            self._recover(target, info)
            return
        finally:
            transfer.discard()
        log.info("gallery sync %s: applied %s %d of group %s in %.2f s: %d identities, "
                 "%d embeddings", self.device_id, info.kind, info.version, self.group,
                 time.monotonic() - started, self.gallery.identity_count,
                 self.gallery.embedding_count)
        self.publisher.update_status(gallery_version=self.gallery.version,
                                     gallery_group=self.group)

    def _recover(self, target: Manifest, failed: ObjectInfo) -> None:
        """After an object failed to apply, fetch the snapshot if that can help, else resync."""
        applied = self.gallery.version
        if failed.kind == "delta" and applied < target.snapshot.version:
            log.info("gallery sync %s: fetching snapshot %d instead", self.device_id,
                     target.snapshot.version)
            self._force_snapshot = True
            self._plan()
            return
        self._request_resync(f"{failed.kind} {failed.version} could not be applied")
        self._target = None
        self._target_text_sha256 = ""
        self._discard_transfers()

    def _finish_target(self) -> None:
        target = self._target
        if target is None or self.gallery.version < target.version:
            return
        log.info("gallery sync %s: group %s is at version %d", self.device_id, self.group,
                 self.gallery.version)
        self._force_snapshot = False
        self._target = None
        self._target_text_sha256 = ""
        self._discard_transfers()

    def _discard_transfers(self) -> None:
        for transfer in self._transfers.values():
            transfer.discard()
        self._transfers.clear()
        self._set_snapshot_filter(None)

    def _check_progress(self) -> None:
        if self._target is None:
            return
        now = time.monotonic()
        if now - self._last_progress < self.settings.fetch_timeout_s:
            return
        missing = {
            f"{kind} {version}": transfer.info.chunk_count - len(transfer.received)
            for (kind, version), transfer in self._transfers.items()
        }
        self._last_progress = now
        self._request_resync(f"no new chunk for {self.settings.fetch_timeout_s:.3g} s; "
                             f"chunks missing: {missing}")

    def _request_resync(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_resync < self.settings.resync_interval_s:
            log.debug("gallery sync %s: resync not requested again yet: %s", self.device_id,
                      reason)
            return
        self._last_resync = now
        request = {
            "device_id": self.device_id,
            "group": self.group,
            "applied_version": self.gallery.version,
            "manifest_version": self._target.version if self._target else None,
            "reason": reason[:500],
        }
        log.warning("gallery sync %s: requesting a resync of group %s at version %d: %s",
                    self.device_id, self.group, self.gallery.version, reason)
        self.publisher.publish(resync_topic(self.prefix, self.group),
                               json.dumps(request).encode("utf-8"))

    # Helpers

    def _set_snapshot_filter(self, topic_filter: str | None) -> None:
        if topic_filter == self._snapshot_filter:
            return
        if self._snapshot_filter is not None:
            self.publisher.unsubscribe(self._snapshot_filter)
        self._snapshot_filter = topic_filter
        if topic_filter is not None:
            self.publisher.subscribe(topic_filter, self._on_message)

    def _keep_unverified(self, key: tuple[str, int, int, str], payload: bytes) -> None:
        if key in self._unverified:
            return
        self._unverified[key] = payload
        self._unverified_bytes += len(payload)
        while self._unverified_bytes > UNVERIFIED_BYTES:
            oldest = next(iter(self._unverified))
            log.debug("gallery sync %s: dropped unverified chunk %s to stay under %d bytes",
                      self.device_id, oldest, UNVERIFIED_BYTES)
            self._drop_unverified(oldest)

    def _drop_unverified(self, key: tuple[str, int, int, str]) -> None:
        self._unverified_bytes -= len(self._unverified.pop(key))

    def _spool_path(self, version: int) -> Path:
        path = self.gallery.path
        return path.with_name(f"{path.name}.snapshot-{version}.part")

    def _discard_stale_spools(self) -> None:
        # NOTE: a snapshot transfer does not resume across agent restarts; its
        # partial file is deleted here and the transfer starts again.
        path = self.gallery.path
        for stale in path.parent.glob(f"{path.name}.snapshot-*.part"):
            log.info("gallery sync %s: removing partial snapshot %s from an earlier run",
                     self.device_id, stale)
            with contextlib.suppress(OSError):
                os.unlink(stale)


def start_gallery_sync(config: Config, gallery: Gallery, publisher: Publisher,
                       model: ModelManifest) -> GallerySync | None:
    """Start syncing when `sync.group` is set; the hook that the run loop calls.

    Returns None when sync is disabled. Call `stop()` on the result before the
    gallery is closed.
    """
    if not config.sync.group:
        return None
    sync = GallerySync(
        gallery=gallery,
        publisher=publisher,
        device_id=config.device_id,
        topic_prefix=config.mqtt.topic_prefix,
        settings=config.sync,
        model_id=model.model_id,
        embedding_size=model.embedding_size,
        metric=model.metric,
    )
    sync.start()
    wait_s = config.sync.first_sync_wait_s
    if wait_s > 0 and gallery.version == 0:
        log.info("gallery sync %s: waiting up to %.3g s for the first gallery of group %s",
                 config.device_id, wait_s, config.sync.group)
        if not sync.wait_for_version(wait_s):
            log.warning("gallery sync %s: no gallery from group %s within sync.first_sync_wait_s "
                        "(%.3g s); starting with an empty gallery, so every face is unknown "
                        "until one arrives", config.device_id, config.sync.group, wait_s)
    return sync
