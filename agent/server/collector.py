"""Collect the devices' identity events into the sightings store.

Each collector subscribes with an MQTT 5 shared subscription,
`$share/<share_group>/<prefix>/+/events/identity`, so the broker hands each
event to one collector of the group. More collector processes share the load
without duplicates. A redelivered QoS 1 event has the same event_id, and the
store skips ids that it already holds.

The network thread only queues events; a worker thread validates them and
writes them in batches, one transaction per batch.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import CollectorConfig
from agent.server.client import ServerClient, describe
from agent.server.store import ServerStore, Sighting

log = logging.getLogger(__name__)

QUEUE_EVENTS = 10_000


def events_filter(prefix: str) -> str:
    return f"{prefix}/+/events/identity"


class SightingsCollector:
    """Writes identity events from the broker into a store; see the module docstring."""

    def __init__(self, store: ServerStore, client: ServerClient, topic_prefix: str,
                 settings: CollectorConfig) -> None:
        self.store = store
        self.client = client
        self.prefix = topic_prefix
        self.settings = settings
        self._queue: queue.Queue[tuple[int, bytes]] = queue.Queue(QUEUE_EVENTS)
        self.stored = 0
        self.rejected = 0

    @property
    def subscription(self) -> str:
        return f"$share/{self.settings.share_group}/{events_filter(self.prefix)}"

    def start(self) -> None:
        self.client.subscribe(self.subscription, self._on_event)
        log.info("collector %s: subscribed to %s", self.client.client_id, self.subscription)

    def _on_event(self, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        if len(payload) > self.settings.max_event_bytes:
            self.rejected += 1
            log.warning("collector: event mid %d on %s rejected: %d bytes, more than "
                        "collector.max_event_bytes %d", message.mid, message.topic,
                        len(payload), self.settings.max_event_bytes)
            return
        try:
            self._queue.put((message.mid, payload), timeout=5.0)
        except queue.Full:
            self.rejected += 1
            log.error("collector: event mid %d on %s dropped, %d events wait for the store",
                      message.mid, message.topic, QUEUE_EVENTS)

    def serve(self, stop: threading.Event) -> None:
        """Write queued events to the store until `stop` is set, then write the rest."""
        while True:
            batch = self._take_batch(timeout_s=0.2)
            if batch:
                self._write(batch)
            elif stop.is_set():
                return

    def _take_batch(self, timeout_s: float) -> list[Sighting]:
        batch: list[Sighting] = []
        try:
            mid, payload = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return batch
        while True:
            sighting = self._parse(mid, payload)
            if sighting is not None:
                batch.append(sighting)
            if len(batch) >= self.settings.batch_size:
                return batch
            try:
                mid, payload = self._queue.get_nowait()
            except queue.Empty:
                return batch

    def _write(self, batch: list[Sighting]) -> None:
        try:
            inserted = self.store.add_sightings(batch)
        except Exception:
            # NOTE: the batch is lost here; the devices' outbox already got its PUBACK.
            log.exception("collector: writing %d sightings failed (first event %s)",
                          len(batch), batch[0].event_id)
            return
        self.stored += inserted
        log.debug("collector: stored %d of %d sightings (the rest were duplicates)",
                  inserted, len(batch))

    def _parse(self, mid: int, payload: bytes) -> Sighting | None:
        try:
            event = json.loads(payload, parse_constant=_reject_constant)
            sighting = _sighting(event, payload)
        except (ValueError, TypeError, KeyError) as exc:
            self.rejected += 1
            log.warning("collector: event mid %d rejected: %s; payload %s", mid, exc,
                        describe(payload))
            return None
        return sighting


def _reject_constant(name: str) -> Any:
    raise ValueError(f"JSON contains {name}")


def _sighting(event: Any, payload: bytes) -> Sighting:
    if not isinstance(event, dict):
        raise ValueError("event is not a JSON object")
    event_id, device_id = event["event_id"], event["device_id"]
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= 64:
        raise ValueError("event_id must be a string of 1 to 64 characters")
    if not isinstance(device_id, str) or not 1 <= len(device_id) <= 64:
        raise ValueError("device_id must be a string of 1 to 64 characters")
    identity = event.get("identity") or {}
    if not isinstance(identity, dict):
        raise ValueError("identity must be an object")
    identity_id, name = identity.get("id"), identity.get("name")
    for value, key in ((identity_id, "identity.id"), (name, "identity.name")):
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            raise ValueError(f"{key} must be null or a string of at most 256 characters")
    distance = event.get("distance")
    if distance is not None and (not isinstance(distance, (int, float)) or
                                 not math.isfinite(distance)):
        raise ValueError("distance must be null or a finite number")
    version = event.get("gallery_version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise ValueError("gallery_version must be an integer")
    model_id, capture_time = event.get("model_id"), event.get("capture_time")
    return Sighting(
        event_id=event_id,
        device_id=device_id,
        identity_id=identity_id,
        name=name,
        distance=float(distance) if distance is not None else None,
        gallery_version=version,
        model_id=str(model_id)[:128] if model_id is not None else None,
        capture_time=str(capture_time)[:64] if capture_time is not None else None,
        payload=payload.decode("utf-8"),
    )
