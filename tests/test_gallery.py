"""Gallery storage and matching, checked against hand-computed distances."""

from __future__ import annotations

import math
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
