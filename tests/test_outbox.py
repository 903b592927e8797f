"""The SQLite outbox on its own: order, bounds, full policies, TTL and reopening."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.outbox import Outbox, OutboxError

TOPIC = "facenet/gate-01/events/identity"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def payload(index: int, size: int = 10) -> bytes:
    return f"{index:0{size}d}".encode()


def ids(outbox: Outbox) -> list[str]:
    return [entry.event_id for entry in outbox.pending(0, 1_000_000)]


def test_pending_in_insert_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    for i in range(5):
        assert outbox.put(f"e{i}", TOPIC, payload(i))

    entries = outbox.pending(0, 10)

    assert [e.event_id for e in entries] == ["e0", "e1", "e2", "e3", "e4"]
    assert [e.payload for e in entries] == [payload(i) for i in range(5)]
    assert {e.topic for e in entries} == {TOPIC}
    assert [e.event_id for e in outbox.pending(entries[1].seq, 2)] == ["e2", "e3"]
    assert outbox.depth == 5
    assert outbox.size_bytes == 50


def test_remove_deletes_only_given(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    for i in range(4):
        outbox.put(f"e{i}", TOPIC, payload(i))
    seqs = [e.seq for e in outbox.pending(0, 10)]

    assert outbox.remove([seqs[0], seqs[2], 999_999]) == 2

    assert ids(outbox) == ["e1", "e3"]
    assert outbox.depth == 2
    assert outbox.size_bytes == 20
    assert outbox.remove([]) == 0


def test_duplicate_event_id_stored_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")

    assert outbox.put("same", TOPIC, b"first")
    assert outbox.put("same", TOPIC, b"second")

    assert outbox.depth == 1
    assert outbox.pending(0, 10)[0].payload == b"first"


def test_reopen_keeps_events_and_counters(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, max_events=2)
    for i in range(3):
        outbox.put(f"e{i}", TOPIC, payload(i))
    last_seq = outbox.pending(0, 10)[-1].seq
    outbox.close()

    reopened = Outbox(path, max_events=2)

    assert ids(reopened) == ["e1", "e2"]
    assert reopened.depth == 2
    assert reopened.dropped_full == 1
    reopened.remove([e.seq for e in reopened.pending(0, 10)])
    reopened.put("e3", TOPIC, payload(3))
    # AUTOINCREMENT never hands out a seq again, even after the table emptied.
    assert reopened.pending(0, 10)[0].seq > last_seq


def test_drop_oldest_when_count_full(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_events=3, full_policy="drop_oldest")
    for i in range(5):
        assert outbox.put(f"e{i}", TOPIC, payload(i))

    assert ids(outbox) == ["e2", "e3", "e4"]
    assert outbox.dropped_full == 2
    assert outbox.dropped == 2


def test_drop_oldest_when_bytes_full(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_bytes=1024, full_policy="drop_oldest")
    for i in range(4):
        outbox.put(f"e{i}", TOPIC, payload(i, size=300))

    assert outbox.put("big", TOPIC, payload(9, size=700))

    assert ids(outbox) == ["e3", "big"]
    assert outbox.size_bytes == 1000
    assert outbox.dropped_full == 3


def test_reject_new_when_full(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_events=2, full_policy="reject_new")
    assert outbox.put("e0", TOPIC, payload(0))
    assert outbox.put("e1", TOPIC, payload(1))

    assert not outbox.put("e2", TOPIC, payload(2))

    assert ids(outbox) == ["e0", "e1"]
    assert outbox.dropped_full == 1


def test_event_larger_than_limit_rejected(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", max_bytes=1024)
    outbox.put("small", TOPIC, b"x")

    assert not outbox.put("huge", TOPIC, b"x" * 2000)

    assert ids(outbox) == ["small"]
    assert outbox.dropped_full == 1


def test_expire_drops_old_events(tmp_path: Path) -> None:
    clock = FakeClock()
    outbox = Outbox(tmp_path / "outbox.db", ttl_s=60.0, clock=clock)
    outbox.put("old", TOPIC, b"a")
    clock.now += 30
    outbox.put("newer", TOPIC, b"b")
    clock.now += 40

    assert outbox.expire() == 1

    assert ids(outbox) == ["newer"]
    assert outbox.dropped_expired == 1
    assert outbox.dropped == 1
    assert outbox.depth == 1


def test_damaged_file_raises_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not an SQLite database" * 100)

    with pytest.raises(OutboxError, match="move it aside"):
        Outbox(path)


def test_file_is_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    outbox.put("e0", TOPIC, b"a")

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "outbox.db-wal").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"full_policy": "keep_all"}, "full_policy must be one of"),
        ({"sync": "off"}, "sync must be one of"),
        ({"max_events": 0}, "must be positive"),
    ],
)
def test_invalid_settings_rejected(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Outbox(tmp_path / "outbox.db", **options)


def test_outbox_of_other_device_rejected(tmp_path: Path) -> None:
    Outbox(tmp_path / "outbox.db", device_id="gate-01").close()

    with pytest.raises(OutboxError) as caught:
        Outbox(tmp_path / "outbox.db", device_id="gate-02")

    message = str(caught.value)
    assert "'gate-01'" in message
    assert "'gate-02'" in message
    assert "outbox.path" in message


def test_outbox_reopened_by_same_device(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db", device_id="gate-01")
    outbox.put("a", "t", b"x")
    outbox.close()

    reopened = Outbox(tmp_path / "outbox.db", device_id="gate-01")

    assert reopened.depth == 1


def test_dead_letter_moves_event(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.put("a", "t", b"x")
    outbox.put("b", "t", b"y")
    (first, _) = outbox.pending(0, 10)

    assert outbox.dead_letter(first.seq, "bad topic")
    assert ids(outbox) == ["b"]
    assert outbox.dropped_unpublishable == 1
    assert outbox.dropped == 1
