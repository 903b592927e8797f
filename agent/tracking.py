"""An IoU tracker that turns per-frame recognitions into appearances.

Each face box is linked to the track whose last box overlaps it most, greedily
by descending IoU, when the overlap reaches `iou_threshold`. A track keeps the
labels of its last `confirm_window` frames: the matched identity id, None for an
unknown face, or a gap for a frame where the face was missing. An identity is
confirmed when it fills at least `confirm_frames` of those slots, and confirmed
again when another label later does, for example when a face first seen as
unknown turns towards the camera. A track whose face is missing for more than
`max_missed_frames` frames has left.

`update()` and `flush()` return `AppearanceUpdate`s: "confirmed" when a label is
confirmed, "left" when a confirmed track ends. Tracks that never reach
confirmation end silently, so a one-frame false detection publishes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# Tracks alive at once; past it the track seen longest ago ends early. Only a
# flood of false detections comes near it: it bounds memory, not a real scene.
MAX_TRACKS = 1000


class _Gap:
    """History slot of a frame in which the track's face was not found."""


_GAP = _Gap()


@dataclass(frozen=True)
class Observation:
    """One recognised face in one frame."""

    bbox: np.ndarray  # x1, y1, x2, y2 in pixels
    identity_id: str | None
    name: str | None
    distance: float  # to the nearest gallery embedding; inf when the gallery is empty
    detection_score: float


@dataclass
class Track:
    appearance_id: str
    bbox: np.ndarray
    first_seen: float  # capture times, seconds since the Unix epoch
    last_seen: float
    source: str
    frames_seen: int = 0
    missed: int = 0
    history: deque[str | None | _Gap] = field(default_factory=deque)
    confirmed: bool = False
    label: str | None = None  # the confirmed identity id; None is unknown
    names: dict[str | None, str | None] = field(default_factory=dict)
    best_distance: dict[str | None, float] = field(default_factory=dict)
    detection_score: float = 0.0


@dataclass(frozen=True)
class AppearanceUpdate:
    """A confirmation or a departure of one tracked face, ready to become an event."""

    phase: str  # "confirmed" or "left"
    appearance_id: str
    identity_id: str | None
    name: str | None
    best_distance: float  # the least distance among frames labelled with this identity
    first_seen: float
    last_seen: float
    capture_time: float  # of the frame that caused this update
    frames_seen: int
    bbox: np.ndarray
    detection_score: float
    source: str


class IouTracker:
    """Links faces across the frames of one source; not thread-safe."""

    def __init__(self, *, iou_threshold: float = 0.3, confirm_frames: int = 3,
                 confirm_window: int = 5, max_missed_frames: int = 10) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if not 1 <= confirm_frames <= confirm_window:
            raise ValueError(
                f"confirm_frames must be between 1 and confirm_window ({confirm_window}), "
                f"got {confirm_frames}"
            )
        if max_missed_frames < 1:
            raise ValueError(f"max_missed_frames must be at least 1, got {max_missed_frames}")
        self.iou_threshold = iou_threshold
        self.confirm_frames = confirm_frames
        self.confirm_window = confirm_window
        self.max_missed_frames = max_missed_frames
        self._tracks: list[Track] = []

    @property
    def track_count(self) -> int:
        return len(self._tracks)

    def update(self, observations: Sequence[Observation], capture_time: float,
               source: str) -> list[AppearanceUpdate]:
        """Add one frame's faces; return the confirmations and departures it causes."""
        updates: list[AppearanceUpdate] = []
        pairs = self._assign(observations)
        matched_tracks = {track_index for track_index, _ in pairs}
        matched_observations = {obs_index for _, obs_index in pairs}

        for track_index, obs_index in pairs:
            track = self._tracks[track_index]
            self._observe(track, observations[obs_index], capture_time, source)
            confirmation = self._check_confirmation(track, capture_time)
            if confirmation is not None:
                updates.append(confirmation)

        survivors = []
        for index, track in enumerate(self._tracks):
            if index not in matched_tracks:
                track.missed += 1
                track.history.append(_GAP)
                if track.missed > self.max_missed_frames:
                    updates.extend(self._end(track, capture_time))
                    continue
            survivors.append(track)
        self._tracks = survivors

        for obs_index, observation in enumerate(observations):
            if obs_index in matched_observations:
                continue
            track = self._new_track(observation, capture_time, source)
            confirmation = self._check_confirmation(track, capture_time)
            if confirmation is not None:
                updates.append(confirmation)

        if len(self._tracks) > MAX_TRACKS:
            self._tracks.sort(key=lambda t: t.last_seen)
            excess, self._tracks = self._tracks[:-MAX_TRACKS], self._tracks[-MAX_TRACKS:]
            log.warning("tracker: %d tracks alive, more than %d; ending the %d seen longest ago",
                        len(self._tracks) + len(excess), MAX_TRACKS, len(excess))
            for track in excess:
                updates.extend(self._end(track, capture_time))
        return updates

    def flush(self, capture_time: float) -> list[AppearanceUpdate]:
        """End every track, as at the end of a source or at shutdown."""
        updates: list[AppearanceUpdate] = []
        for track in self._tracks:
            updates.extend(self._end(track, capture_time))
        self._tracks = []
        return updates

    # Steps

    def _assign(self, observations: Sequence[Observation]) -> list[tuple[int, int]]:
        if not self._tracks or not observations:
            return []
        tracks = np.stack([t.bbox for t in self._tracks]).astype(np.float64)
        boxes = np.stack([np.asarray(o.bbox[:4], dtype=np.float64) for o in observations])
        overlaps = iou_matrix(tracks, boxes)
        pairs: list[tuple[int, int]] = []
        used_tracks: set[int] = set()
        used_boxes: set[int] = set()
        order = np.argsort(-overlaps, axis=None, kind="stable")
        for flat in order:
            track_index, box_index = divmod(int(flat), overlaps.shape[1])
            if overlaps[track_index, box_index] < self.iou_threshold:
                break
            if track_index in used_tracks or box_index in used_boxes:
                continue
            pairs.append((track_index, box_index))
            used_tracks.add(track_index)
            used_boxes.add(box_index)
        return pairs

    def _new_track(self, observation: Observation, capture_time: float, source: str) -> Track:
        track = Track(
            appearance_id=str(uuid.uuid4()),
            bbox=np.asarray(observation.bbox[:4], dtype=np.float64),
            first_seen=capture_time,
            last_seen=capture_time,
            source=source,
            frames_seen=0,
            history=deque(maxlen=self.confirm_window),
        )
        self._observe(track, observation, capture_time, source)
        self._tracks.append(track)
        return track

    def _observe(self, track: Track, observation: Observation, capture_time: float,
                 source: str) -> None:
        track.bbox = np.asarray(observation.bbox[:4], dtype=np.float64)
        track.last_seen = capture_time
        track.source = source
        track.frames_seen += 1
        track.missed = 0
        track.detection_score = float(observation.detection_score)
        label = observation.identity_id
        track.history.append(label)
        track.names[label] = observation.name
        previous = track.best_distance.get(label, float("inf"))
        track.best_distance[label] = min(previous, float(observation.distance))

    def _check_confirmation(self, track: Track, capture_time: float) -> AppearanceUpdate | None:
        counts: Counter[str | None] = Counter()
        for label in track.history:
            if not isinstance(label, _Gap):
                counts[label] += 1
        if not counts:
            return None
        # most_common keeps first-seen order among equal counts.
        label, count = counts.most_common(1)[0]
        if count < self.confirm_frames:
            return None
        if track.confirmed and label == track.label:
            return None
        track.confirmed = True
        track.label = label
        return self._snapshot(track, "confirmed", capture_time)

    def _end(self, track: Track, capture_time: float) -> list[AppearanceUpdate]:
        if not track.confirmed:
            log.debug("tracker: track %s ended unconfirmed after %d frames",
                      track.appearance_id, track.frames_seen)
            return []
        return [self._snapshot(track, "left", track.last_seen)]

    @staticmethod
    def _snapshot(track: Track, phase: str, capture_time: float) -> AppearanceUpdate:
        label = track.label
        return AppearanceUpdate(
            phase=phase,
            appearance_id=track.appearance_id,
            identity_id=label,
            name=track.names.get(label),
            best_distance=track.best_distance.get(label, float("inf")),
            first_seen=track.first_seen,
            last_seen=track.last_seen,
            capture_time=capture_time,
            frames_seen=track.frames_seen,
            bbox=track.bbox.copy(),
            detection_score=track.detection_score,
            source=track.source,
        )


def iou_matrix(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return the IoU of every box in `first` (N x 4) with every box in `second` (M x 4)."""
    x1 = np.maximum(first[:, None, 0], second[None, :, 0])
    y1 = np.maximum(first[:, None, 1], second[None, :, 1])
    x2 = np.minimum(first[:, None, 2], second[None, :, 2])
    y2 = np.minimum(first[:, None, 3], second[None, :, 3])
    intersection = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_first = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
    area_second = (second[:, 2] - second[:, 0]) * (second[:, 3] - second[:, 1])
    union = area_first[:, None] + area_second[None, :] - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)
