"""Gallery storage and matching, checked against hand-computed distances."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.gallery import Gallery, GalleryError


def _unit(*values: float) -> np.ndarray:
    vector = np.array(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def gallery(tmp_path: Path) -> Gallery:
    store = Gallery(tmp_path / "gallery.db", "model-a", 3)
    store.add("alice", "Alice", np.stack([_unit(1, 0, 0), _unit(1, 1, 0)]), ["a1.jpg", "a2.jpg"])
    store.add("bob", "Bob", np.stack([_unit(0, 0, 1)]), ["b1.jpg"])
    return store


def test_nearest_identity_with_euclidean_distance(gallery: Gallery) -> None:
    probe = _unit(1, 0.2, 0)

    (match,) = gallery.match(probe[None], threshold=1.1, metric="euclidean")

    # Nearest stored vector is alice's (1, 0, 0): |(0.98058, 0.19612, 0) - (1, 0, 0)|.
    expected = math.sqrt((1 - 1 / math.sqrt(1.04)) ** 2 + (0.2 / math.sqrt(1.04)) ** 2)
    assert match.identity_id == "alice"
    assert match.name == "Alice"
    assert match.distance == pytest.approx(expected, abs=1e-6)


def test_squared_metric_reports_squared_distance(gallery: Gallery) -> None:
    (match,) = gallery.match(_unit(0, 1, 1)[None], threshold=1.1, metric="squared_euclidean")

    # |(0, .7071, .7071) - (0, 0, 1)|^2 = 0.5 + (1 - 0.7071)^2 = 2 - sqrt(2).
    assert match.identity_id == "bob"
    assert match.distance == pytest.approx(2 - math.sqrt(2), abs=1e-6)


def test_far_face_is_unknown(gallery: Gallery) -> None:
    (match,) = gallery.match(_unit(-1, 0, 0)[None], threshold=1.1, metric="euclidean")

    # The nearest vector is bob's (0, 0, 1) at distance sqrt(2).
    assert match.identity_id is None
    assert not match.known
    assert match.distance == pytest.approx(math.sqrt(2), abs=1e-6)


def test_empty_gallery_gives_unknown(tmp_path: Path) -> None:
    store = Gallery(tmp_path / "empty.db", "model-a", 3)

    matches = store.match(np.stack([_unit(1, 0, 0), _unit(0, 1, 0)]), 1.1, "euclidean")

    assert [m.identity_id for m in matches] == [None, None]
    assert all(math.isinf(m.distance) for m in matches)
    assert store.version == 0


def test_version_increments_per_change(gallery: Gallery) -> None:
    assert gallery.version == 2

    gallery.add("carol", "Carol", _unit(0, 1, 0)[None], ["c1.jpg"])

    assert gallery.version == 3
    assert gallery.identity_count == 3


def test_gallery_survives_reopen(gallery: Gallery, tmp_path: Path) -> None:
    gallery.close()
    reopened = Gallery(tmp_path / "gallery.db", "model-a", 3)

    (match,) = reopened.match(_unit(0, 0, 1)[None], 1.1, "euclidean")

    assert match.identity_id == "bob"
    assert reopened.version == 2


def test_other_model_rejected(gallery: Gallery, tmp_path: Path) -> None:
    gallery.close()

    with pytest.raises(GalleryError, match="contains embeddings of model model-a"):
        Gallery(tmp_path / "gallery.db", "model-b", 3)


def test_wrong_embedding_size_rejected(gallery: Gallery) -> None:
    with pytest.raises(GalleryError, match=r"expected embeddings of shape \(n, 3\)"):
        gallery.add("dave", "Dave", np.ones((1, 4), dtype=np.float32), ["d.jpg"])
    assert gallery.version == 2


def test_nan_embedding_rejected(gallery: Gallery) -> None:
    vectors = np.array([[np.nan, 0, 0]], dtype=np.float32)

    with pytest.raises(GalleryError, match="NaN or inf"):
        gallery.add("erin", "Erin", vectors, ["e.jpg"])
    assert gallery.identity_count == 2


def _synced_gallery(path: Path, rows: np.ndarray, index_mode: str) -> Gallery:
    from agent.gallery_protocol import IdentityChange

    store = Gallery(path, "model-a", rows.shape[1], index_mode=index_mode)
    changes = [IdentityChange(f"id-{i}", f"Name {i}", "add", i, 1) for i in range(len(rows))]
    store.apply_snapshot("lobby", 1, changes, rows)
    return store


def _random_unit_rows(count: int, dimension: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_approximate_index_matches_exact(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    rows = _random_unit_rows(5000, 32, seed=1)
    probes = rows[:200] + 0.05 * _random_unit_rows(200, 32, seed=2)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    exact = _synced_gallery(tmp_path / "exact.db", rows, "exact")
    approximate = _synced_gallery(tmp_path / "approximate.db", rows, "approximate")

    deadline = time.monotonic() + 60
    while not approximate.approximate_ready and time.monotonic() < deadline:
        time.sleep(0.05)
    expected = exact.match(probes, threshold=1.1, metric="euclidean")
    found = approximate.match(probes, threshold=1.1, metric="euclidean")

    assert approximate.approximate_ready
    assert not exact.approximate_ready
    assert [m.identity_id for m in found] == [m.identity_id for m in expected]
    assert [m.distance for m in found] == pytest.approx([m.distance for m in expected],
                                                        abs=1e-5)
    assert [m.identity_id for m in found] == [f"id-{i}" for i in range(200)]


def _wait_for_index(store: Gallery, version: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = store._state
        if state.version == version and state.index is not None:
            return
        time.sleep(0.05)


def test_approximate_index_after_delta(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    from agent.gallery_protocol import IdentityChange

    rows = _random_unit_rows(3001, 32, seed=6)
    store = _synced_gallery(tmp_path / "gallery.db", rows[:3000], "approximate")
    _wait_for_index(store, 1)
    first_index = store._state.index
    changes = [
        IdentityChange("id-7", "", "remove", 0, 0),
        IdentityChange("id-8", "Renamed", "update", 0, 1),
        IdentityChange("new", "New", "add", 1, 1),
    ]
    probes = rows[[7, 3000, 9]]

    store.apply_delta("lobby", 1, 2, changes, np.stack([rows[8], rows[3000]]))
    # This match may run before version 2's index is ready, so exact search may serve it.
    before_rebuild = store.match(probes, threshold=0.1, metric="euclidean")
    _wait_for_index(store, 2)
    after_rebuild = store.match(probes, threshold=0.1, metric="euclidean")

    assert first_index is not None
    assert store._state.index is not None
    assert store._state.index is not first_index
    assert store._state.index.rows == 3000
    for matches in (before_rebuild, after_rebuild):
        assert matches[0].identity_id is None
        assert matches[1].identity_id == "new"
        assert matches[2].identity_id == "id-9"
        assert all(m.gallery_version == 2 for m in matches)
    assert store.match(rows[8:9], 0.1, "euclidean")[0].name == "Renamed"


def test_index_miss_falls_back_to_exact(tmp_path: Path) -> None:
    class MissingIndex:
        rows = 50

        def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (np.full(len(queries), -1, np.int64),
                    np.full(len(queries), -np.inf, np.float32))

    rows = _random_unit_rows(50, 8, seed=3)
    store = _synced_gallery(tmp_path / "gallery.db", rows, "exact")
    store._state = replace(store._state, index=MissingIndex())  # type: ignore[arg-type]

    matches = store.match(rows[[7, 30]], threshold=0.5, metric="euclidean")

    assert [m.identity_id for m in matches] == ["id-7", "id-30"]
    assert all(m.distance < 1e-3 for m in matches)


def test_delta_state_equals_reload(tmp_path: Path) -> None:
    from agent.gallery_protocol import IdentityChange

    rows = _random_unit_rows(40, 8, seed=4)
    store = _synced_gallery(tmp_path / "gallery.db", rows[:30], "exact")
    changes = [
        IdentityChange("id-3", "Renamed", "update", 0, 2),
        IdentityChange("id-7", "", "remove", 2, 0),
        IdentityChange("new", "New", "add", 2, 3),
    ]
    store.apply_delta("lobby", 1, 2, changes, rows[30:35])

    reopened = Gallery(tmp_path / "gallery.db", "model-a", 8)

    assert store.version == reopened.version == 2
    assert store._state.owners == reopened._state.owners
    assert store._state.names == reopened._state.names
    np.testing.assert_array_equal(store._state.vectors, reopened._state.vectors)
    assert store._state.vectors.flags.f_contiguous
    assert store.match(rows[30:31], 0.1, "euclidean")[0].name == "Renamed"
    assert store.match(rows[7:8], 0.1, "euclidean")[0].identity_id is None
    reopened.close()


def test_snapshot_state_equals_reload(tmp_path: Path) -> None:
    from agent.gallery_protocol import IdentityChange

    rows = _random_unit_rows(6, 8, seed=5)
    store = Gallery(tmp_path / "gallery.db", "model-a", 8)
    # Out of row order: the state must follow the changes, as the file does.
    changes = [IdentityChange("b", "B", "add", 4, 2), IdentityChange("a", "A", "add", 0, 3)]
    store.apply_snapshot("lobby", 1, changes, rows)

    reopened = Gallery(tmp_path / "gallery.db", "model-a", 8)

    assert store._state.owners == reopened._state.owners == ["b", "b", "a", "a", "a"]
    assert store._state.names == reopened._state.names
    np.testing.assert_array_equal(store._state.vectors, reopened._state.vectors)
    np.testing.assert_array_equal(store._state.vectors, rows[[4, 5, 0, 1, 2]])
    reopened.close()


@pytest.mark.parametrize("kind", ["garbage", "folder", "unwritable_parent"])
def test_unusable_gallery_path_raises_gallery_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "gallery.db"
    if kind == "garbage":
        path.write_bytes(b"this is not an SQLite file\n" * 100)
    elif kind == "folder":
        path.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "gallery.db"  # its parent is a file

    with pytest.raises(GalleryError, match=f"gallery {path}"):
        Gallery(path, "model-a", 4)


def test_sources_lists_stored_photos(gallery: Gallery) -> None:
    assert gallery.sources("alice") == {"a1.jpg", "a2.jpg"}
    assert gallery.sources("bob") == {"b1.jpg"}
    assert gallery.sources("nobody") == set()


def test_exact_search_across_blocks(tmp_path: Path) -> None:
    from agent.gallery import EXACT_BLOCK_ROWS

    rows = _random_unit_rows(2 * EXACT_BLOCK_ROWS + 100, 8, seed=6)
    store = _synced_gallery(tmp_path / "gallery.db", rows, "exact")
    picked = [0, EXACT_BLOCK_ROWS - 1, EXACT_BLOCK_ROWS, 2 * EXACT_BLOCK_ROWS + 99]

    matches = store.match(rows[picked], threshold=0.01, metric="euclidean")

    assert [m.identity_id for m in matches] == [f"id-{i}" for i in picked]
    assert all(m.distance < 1e-3 for m in matches)


def test_pipeline_gallery_uses_matching_index(tmp_path: Path, model_dir: Path) -> None:
    from agent.config import parse_config
    from agent.pipeline import build_pipeline

    config = parse_config({
        "device_id": "gate-01",
        "models": {"dir": str(model_dir)},
        "gallery": {"path": str(tmp_path / "gallery.db")},
        "matching": {"index": "approximate", "approximate_min_rows": 5000},
    })

    gallery = build_pipeline(config).gallery

    assert gallery.index_mode == "approximate"
    assert gallery.approximate_min_rows == 5000
    gallery.close()
