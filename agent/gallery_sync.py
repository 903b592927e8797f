"""Agent side of gallery sync: follow one server group's signed manifest over MQTT.

The run loop calls `start_gallery_sync` once the MQTT client exists and
`GallerySync.stop` before it closes the gallery. Messages arrive in paho's
network thread, which only queues them. One worker thread checks, stores and
applies them, so a large snapshot never blocks keep-alives or PUBACKs, and an
error on a message is logged and never reaches the network thread.

The worker keeps the gallery at the last good version. It applies a snapshot or
a delta only after the signed manifest vouches for every byte of it, and each
in one SQLite transaction (agent/gallery.py), so a crash leaves the old version
or the new one. A snapshot's chunks are written to a file beside the gallery as
they arrive, and the next run resumes from that file after a stop or a crash.
docs/protocol.md describes the messages and the rules.
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
    ChunkAddress,
    Manifest,
    ObjectInfo,
    ProtocolError,
    decode_digest_list,
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
# Bytes charged per kept chunk on top of its payload: the key, the digest text and
# the dict slot, about 300 bytes measured with tracemalloc. Without it, a flood of
# one-byte chunks would hold millions of entries under the byte cap.
UNVERIFIED_ENTRY_OVERHEAD = 512
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
    """Return the payload cut to LOG_PAYLOAD_BYTES for a log line."""
    if len(payload) <= LOG_PAYLOAD_BYTES:
        return repr(payload)
    return f"{payload[:LOG_PAYLOAD_BYTES]!r}... ({len(payload)} bytes)"


@dataclass
class _Transfer:
    """One snapshot or delta being collected chunk by chunk."""

    info: ObjectInfo
    chunk_bytes: int
    # sha256 of each chunk: from the manifest, or from the digest list once it is complete.
    digests: tuple[str, ...] | None = None
    received: set[int] = field(default_factory=set)
    parts: dict[int, bytes] = field(default_factory=dict)  # deltas, in memory
    digest_list_parts: dict[int, bytes] = field(default_factory=dict)
    spool_path: Path | None = None  # snapshots, on disk beside the gallery
    spool: BinaryIO | None = None

    def __post_init__(self) -> None:
        if not self.info.digest_chunks:
            self.digests = self.info.chunks

    @property
    def complete(self) -> bool:
        return self.digests is not None and len(self.received) == self.info.chunk_count

    def chunk_size(self, index: int, digest_list: bool = False) -> int:
        total = self.info.digest_list_size if digest_list else self.info.size
        return min(self.chunk_bytes, total - index * self.chunk_bytes)

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

    def find_spooled_chunks(self) -> int:
        """Mark the chunks that an earlier run already wrote to the spool; return their count.

        Each chunk counts only when its sha256 matches, so a torn write or another
        object's leftovers are fetched again.
        """
        if self.spool is None or self.digests is None:
            return 0
        for index, digest in enumerate(self.digests):
            if index in self.received:
                continue
            self.spool.seek(index * self.chunk_bytes)
            if hashlib.sha256(self.spool.read(self.chunk_size(index))).hexdigest() == digest:
                self.received.add(index)
        return len(self.received)

    def close(self) -> None:
        """Close the spool and keep its file, so that the next run can resume from it."""
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self.parts.clear()

    def discard(self) -> None:
        self.close()
        if self.spool_path is not None:
            self.spool_path.unlink(missing_ok=True)


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
        # (chunk address, sha256) -> payload. The digest is part of the key, so a
        # forged chunk cannot hide a good one on the same topic.
        self._unverified: OrderedDict[tuple[ChunkAddress, str], bytes] = OrderedDict()
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
            transfer.close()  # a snapshot's spool file stays for the next run to resume
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
            address = parse_chunk_topic(self.prefix, self.group, topic)
        except ProtocolError as exc:
            self.rejected(exc.reason, "message mid %d: %s", mid, exc)
            return
        self._handle_chunk(address, payload, mid, topic)

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
        self._remove_spools(keep=[v for kind, v in wanted if kind == "snapshot"])
        for key, info in wanted.items():
            if key not in self._transfers:
                self._transfers[key] = self._new_transfer(info, target.chunk_bytes)

        self._update_snapshot_filter()
        self._last_progress = time.monotonic()
        self._adopt_unverified()
        self._apply_ready()

    def _update_snapshot_filter(self) -> None:
        """Subscribe to the target snapshot's digest list until it is complete, then its data.

        Data chunks are requested only once their digests are known, so each is
        checked as it arrives and nothing unverified is written to the spool.
        """
        target = self._target
        transfer = None
        if target is not None:
            transfer = self._transfers.get(("snapshot", target.snapshot.version))
        topic_filter = None
        if target is not None and transfer is not None:
            base = f"{group_topic(self.prefix, self.group)}/snapshot/{target.snapshot.version}"
            topic_filter = f"{base}/+" if transfer.digests is not None else f"{base}/digests/+"
        self._set_snapshot_filter(topic_filter)

    def _adopt_unverified(self) -> None:
        """Hand early chunks to the transfers that now expect them."""
        for early, payload in list(self._unverified.items()):
            address, _digest = early
            transfer = self._transfers.get((address.kind, address.version))
            if early not in self._unverified:
                continue  # a completed digest list already adopted it, one call deeper
            if transfer is None or (transfer.digests is None and not address.digest_list):
                continue
            self._drop_unverified(early)
            if address.digest_list:
                self._store_digest_list_chunk(transfer, address.index, payload, -1)
            else:
                self._store_chunk(transfer, address.index, payload, -1)

    def _new_transfer(self, info: ObjectInfo, chunk_bytes: int) -> _Transfer:
        transfer = _Transfer(info, chunk_bytes)
        if info.kind == "snapshot":
            path = self._spool_path(info.version)
            transfer.spool_path = path
            if path.exists():
                # An earlier run stopped during this snapshot: keep what it wrote.
                transfer.spool = path.open("r+b")
                transfer.spool.truncate(info.size)
                self._resume_spool(transfer)
            else:
                transfer.spool = path.open("w+b")
        return transfer

    def _resume_spool(self, transfer: _Transfer) -> None:
        if transfer.spool is None or transfer.digests is None:
            return
        found = transfer.find_spooled_chunks()
        if found:
            log.info("gallery sync %s: resuming snapshot %d with %d of %d chunks from %s",
                     self.device_id, transfer.info.version, found, transfer.info.chunk_count,
                     transfer.spool_path)

    def _handle_chunk(self, address: ChunkAddress, payload: bytes, mid: int,
                      topic: str) -> None:
        if address.version <= self.gallery.version:
            log.debug("gallery sync %s: chunk %s ignored, version %d is applied",
                      self.device_id, topic, self.gallery.version)
            return
        transfer = self._transfers.get((address.kind, address.version))
        if transfer is None or (transfer.digests is None and not address.digest_list):
            if address.kind == "delta" and payload:
                # Kept until a manifest or a digest list vouches for it.
                self._keep_unverified((address, hashlib.sha256(payload).hexdigest()), payload)
            else:
                log.debug("gallery sync %s: chunk %s (mid %d) is not expected now; ignored",
                          self.device_id, topic, mid)
            return
        if address.digest_list:
            self._store_digest_list_chunk(transfer, address.index, payload, mid)
        else:
            self._store_chunk(transfer, address.index, payload, mid)
        self._apply_ready()

    def _store_chunk(self, transfer: _Transfer, index: int, payload: bytes, mid: int) -> None:
        info = transfer.info
        assert transfer.digests is not None
        where = f"{info.kind} {info.version} chunk {index}"
        if index >= info.chunk_count:
            self.rejected("bad_chunk_index", "%s (mid %d): the manifest lists %d chunks",
                          where, mid, info.chunk_count)
            return
        if index in transfer.received:
            log.debug("gallery sync %s: %s (mid %d) is a duplicate; ignored",
                      self.device_id, where, mid)
            return
        if not self._check_digest(transfer, ChunkAddress(info.kind, info.version, index, False),
                                  payload, transfer.digests[index], mid):
            return
        transfer.store(index, payload)
        self._last_progress = time.monotonic()

    def _store_digest_list_chunk(self, transfer: _Transfer, index: int, payload: bytes,
                                 mid: int) -> None:
        info = transfer.info
        where = f"{info.kind} {info.version} digest-list chunk {index}"
        if index >= len(info.digest_chunks):
            self.rejected("bad_chunk_index", "%s (mid %d): the manifest lists %d digest-list "
                          "chunks", where, mid, len(info.digest_chunks))
            return
        if transfer.digests is not None or index in transfer.digest_list_parts:
            log.debug("gallery sync %s: %s (mid %d) is a duplicate; ignored",
                      self.device_id, where, mid)
            return
        if not self._check_digest(transfer, ChunkAddress(info.kind, info.version, index, True),
                                  payload, info.digest_chunks[index], mid):
            return
        transfer.digest_list_parts[index] = payload
        self._last_progress = time.monotonic()
        if len(transfer.digest_list_parts) < len(info.digest_chunks):
            return
        digest_list = b"".join(transfer.digest_list_parts[i]
                               for i in range(len(info.digest_chunks)))
        transfer.digest_list_parts.clear()
        try:
            transfer.digests = decode_digest_list(digest_list, info)
        except ProtocolError as exc:
            self.rejected(exc.reason, "%s: %s", where, exc)
            return
        log.debug("gallery sync %s: digest list of %s %d complete (%d chunks)",
                  self.device_id, info.kind, info.version, info.chunk_count)
        self._resume_spool(transfer)
        self._update_snapshot_filter()
        self._adopt_unverified()

    def _check_digest(self, transfer: _Transfer, address: ChunkAddress, payload: bytes,
                      expected: str, mid: int) -> bool:
        """Return True when the payload's sha256 is the signed one; else log the rejection."""
        digest = hashlib.sha256(payload).hexdigest()
        if digest == expected:
            return True
        part = "digest-list chunk" if address.digest_list else "chunk"
        size = transfer.chunk_size(address.index, address.digest_list)
        self.rejected("truncated" if len(payload) < size else "digest",
                      "%s %d %s %d (mid %d): %d bytes with sha256 %s, the signed manifest "
                      "says %s", address.kind, address.version, part, address.index, mid,
                      len(payload), digest[:16], expected[:16])
        if address.kind == "delta":
            # A newer manifest may list it; keep it until then.
            self._keep_unverified((address, digest), payload)
        return False

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

    def _keep_unverified(self, key: tuple[ChunkAddress, str], payload: bytes) -> None:
        if key in self._unverified:
            return
        self._unverified[key] = payload
        self._unverified_bytes += len(payload) + UNVERIFIED_ENTRY_OVERHEAD
        while self._unverified_bytes > UNVERIFIED_BYTES:
            oldest = next(iter(self._unverified))
            log.debug("gallery sync %s: dropped unverified chunk %s to stay under %d bytes",
                      self.device_id, oldest, UNVERIFIED_BYTES)
            self._drop_unverified(oldest)

    def _drop_unverified(self, key: tuple[ChunkAddress, str]) -> None:
        self._unverified_bytes -= len(self._unverified.pop(key)) + UNVERIFIED_ENTRY_OVERHEAD

    def _spool_path(self, version: int) -> Path:
        path = self.gallery.path
        return path.with_name(f"{path.name}.snapshot-{version}.part")

    def _remove_spools(self, keep: list[int]) -> None:
        """Delete partial snapshot files of versions other than `keep`."""
        path = self.gallery.path
        for spool in path.parent.glob(f"{path.name}.snapshot-*.part"):
            version_text = spool.name[len(f"{path.name}.snapshot-"):-len(".part")]
            if version_text.isdigit() and int(version_text) in keep:
                continue
            log.info("gallery sync %s: removing partial snapshot %s, which the current "
                     "manifest does not need", self.device_id, spool)
            with contextlib.suppress(OSError):
                os.unlink(spool)

    def _discard_stale_spools(self) -> None:
        """Delete partial snapshots that are no newer than the gallery; keep the rest to resume."""
        path = self.gallery.path
        prefix = f"{path.name}.snapshot-"
        keep = []
        for spool in path.parent.glob(f"{prefix}*.part"):
            version_text = spool.name[len(prefix):-len(".part")]
            if version_text.isdigit() and int(version_text) > self.gallery.version:
                keep.append(int(version_text))
                log.info("gallery sync %s: keeping partial snapshot %s from an earlier run to "
                         "resume it", self.device_id, spool)
        self._remove_spools(keep)


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
