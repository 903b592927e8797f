"""Identity events: the JSON that the agent publishes for each recognised face.

The schema and the topic layout are documented in docs/events.md; bump
SCHEMA_VERSION on any change that a consumer could notice.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
APPEARANCE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EventContext:
    """Fields shared by every event of one agent run."""

    device_id: str
    model_id: str
    metric: str
    threshold: float


def identity_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/events/identity"


def status_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/status"


def appearance_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/events/appearance"


def heartbeat_topic(prefix: str, device_id: str) -> str:
    return f"{prefix}/{device_id}/heartbeat"


def identity_event(
    context: EventContext,
    *,
    source: str,
    frame_index: int,
    capture_time: float,
    bbox: np.ndarray,
    detection_score: float,
    identity_id: str | None,
    name: str | None,
    distance: float,
    gallery_version: int,
) -> dict[str, Any]:
    """Build one identity event; `capture_time` is seconds since the Unix epoch."""
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": str(uuid.uuid4()),
        "device_id": context.device_id,
        "source": source,
        "frame_index": frame_index,
        "capture_time": _iso8601(capture_time),
        "identity": {
            "id": identity_id,
            "name": name,
            "known": identity_id is not None,
        },
        # null when the gallery is empty, because JSON has no infinity.
        "distance": round(distance, 6) if math.isfinite(distance) else None,
        "threshold": context.threshold,
        "metric": context.metric,
        "bbox": [round(float(v), 1) for v in bbox[:4]],
        "detection_score": round(float(detection_score), 6),
        "model_id": context.model_id,
        "gallery_version": gallery_version,
    }


def appearance_event(
    context: EventContext,
    *,
    phase: str,
    appearance_id: str,
    source: str,
    capture_time: float,
    first_seen: float,
    last_seen: float,
    frames_seen: int,
    bbox: np.ndarray,
    detection_score: float,
    identity_id: str | None,
    name: str | None,
    best_distance: float,
    gallery_version: int,
) -> dict[str, Any]:
    """Build one appearance event: a tracked face "confirmed" as an identity, or "left".

    Times are seconds since the Unix epoch. Its schema version is
    APPEARANCE_SCHEMA_VERSION, counted apart from the per-frame event's.
    """
    return {
        "schema_version": APPEARANCE_SCHEMA_VERSION,
        "event_id": str(uuid.uuid4()),
        "type": "appearance",
        "phase": phase,
        "appearance_id": appearance_id,
        "device_id": context.device_id,
        "source": source,
        "capture_time": _iso8601(capture_time),
        "first_seen": _iso8601(first_seen),
        "last_seen": _iso8601(last_seen),
        "frames_seen": frames_seen,
        "identity": {
            "id": identity_id,
            "name": name,
            "known": identity_id is not None,
        },
        "best_distance": round(best_distance, 6) if math.isfinite(best_distance) else None,
        "threshold": context.threshold,
        "metric": context.metric,
        "bbox": [round(float(v), 1) for v in bbox[:4]],
        "detection_score": round(float(detection_score), 6),
        "model_id": context.model_id,
        "gallery_version": gallery_version,
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _iso8601(epoch_seconds: float) -> str:
    moment = datetime.fromtimestamp(epoch_seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
