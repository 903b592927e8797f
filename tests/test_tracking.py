"""The IoU tracker: confirmation after k of n frames, departure, unknown faces, flush."""

from __future__ import annotations

import numpy as np
import pytest

from agent.tracking import IouTracker, Observation, iou_matrix


def face(x: float, identity: str | None = "alice", distance: float = 0.5,
         y: float = 0.0, size: float = 100.0) -> Observation:
    return Observation(np.array([x, y, x + size, y + size]), identity,
                       identity.title() if identity else None, distance, 0.99)


def run(tracker: IouTracker, frames: list[list[Observation]], start: float = 100.0) -> list:
    updates = []
    for index, observations in enumerate(frames):
        updates.extend(tracker.update(observations, start + index, f"cam#{index}"))
    return updates


def test_confirmed_after_k_of_n_frames() -> None:
    tracker = IouTracker(confirm_frames=3, confirm_window=5)

    updates = run(tracker, [[face(0)], [face(5)], [face(10)]])

    assert [u.phase for u in updates] == ["confirmed"]
    update = updates[0]
    assert update.identity_id == "alice"
    assert update.name == "Alice"
    assert update.frames_seen == 3
    assert update.first_seen == 100.0
    assert update.capture_time == 102.0
    assert update.source == "cam#2"


def test_no_confirmation_below_k() -> None:
    tracker = IouTracker(confirm_frames=3, confirm_window=5)

    updates = run(tracker, [[face(0)], [face(5)]])

    assert updates == []
    assert tracker.track_count == 1


def test_gap_frames_count_against_window() -> None:
    tracker = IouTracker(confirm_frames=3, confirm_window=3, max_missed_frames=5)

    # Seen, missed, seen, seen: the last three slots hold one gap, so only 2 of 3.
    updates = run(tracker, [[face(0)], [], [face(0)], [face(0)]])

    assert updates == []


def test_left_after_max_missed_frames() -> None:
    tracker = IouTracker(confirm_frames=2, confirm_window=3, max_missed_frames=2)

    updates = run(tracker, [[face(0, distance=0.6)], [face(2, distance=0.4)],
                            [face(4, distance=0.7)], [], [], []])

    assert [u.phase for u in updates] == ["confirmed", "left"]
    left = updates[1]
    assert left.appearance_id == updates[0].appearance_id
    assert left.identity_id == "alice"
    assert left.best_distance == pytest.approx(0.4)
    assert left.first_seen == 100.0
    assert left.last_seen == 102.0
    assert left.capture_time == 102.0
    assert left.frames_seen == 3
    assert tracker.track_count == 0


def test_unknown_face_confirmed_and_upgraded() -> None:
    tracker = IouTracker(confirm_frames=2, confirm_window=3)

    updates = run(tracker, [[face(0, None, 1.3)], [face(0, None, 1.2)],
                            [face(0, "bob", 0.8)], [face(0, "bob", 0.7)]])

    assert [(u.phase, u.identity_id) for u in updates] == [("confirmed", None),
                                                         ("confirmed", "bob")]
    assert updates[0].best_distance == pytest.approx(1.2)
    assert updates[1].best_distance == pytest.approx(0.7)
    assert len({u.appearance_id for u in updates}) == 1


def test_two_faces_tracked_apart() -> None:
    tracker = IouTracker(confirm_frames=2, confirm_window=2)

    updates = run(tracker, [[face(0, "alice"), face(500, "bob")],
                            [face(505, "bob"), face(3, "alice")]])

    assert sorted(u.identity_id for u in updates) == ["alice", "bob"]
    assert len({u.appearance_id for u in updates}) == 2


def test_far_box_starts_new_track() -> None:
    tracker = IouTracker(confirm_frames=1, confirm_window=1, iou_threshold=0.3)

    updates = run(tracker, [[face(0)], [face(300)]])

    assert len({u.appearance_id for u in updates}) == 2


def test_flush_ends_confirmed_tracks_only() -> None:
    tracker = IouTracker(confirm_frames=2, confirm_window=3)
    run(tracker, [[face(0, "alice"), face(500, "bob")], [face(0, "alice")]])

    updates = tracker.flush(200.0)

    assert [(u.phase, u.identity_id) for u in updates] == [("left", "alice")]
    assert tracker.track_count == 0


def test_single_frame_detection_publishes_nothing() -> None:
    tracker = IouTracker(confirm_frames=2, confirm_window=5, max_missed_frames=1)

    updates = run(tracker, [[face(0)], [], [], []])

    assert updates == []
    assert tracker.track_count == 0


def test_iou_matrix_values() -> None:
    first = np.array([[0.0, 0.0, 10.0, 10.0]])
    second = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])

    overlaps = iou_matrix(first, second)

    assert overlaps[0].tolist() == pytest.approx([1.0, 50 / 150, 0.0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"iou_threshold": 0.0}, "iou_threshold"),
        ({"confirm_frames": 4, "confirm_window": 3}, "confirm_frames"),
        ({"max_missed_frames": 0}, "max_missed_frames"),
    ],
)
def test_invalid_settings_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IouTracker(**options)
