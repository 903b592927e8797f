"""The approximate index: nearest rows and exact dot products against a numpy search."""

from __future__ import annotations

import numpy as np
import pytest

from agent import gallery_index
from agent.gallery_index import build_index, subquantizer_count

faiss = pytest.importorskip("faiss")


def _unit_rows(count: int, dimension: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _probes_near(rows: np.ndarray, distance: float, seed: int) -> np.ndarray:
    """Unit vectors at `distance` (Euclidean) from each of `rows`."""
    noise = _unit_rows(len(rows), rows.shape[1], seed)
    noise -= np.sum(noise * rows, axis=1, keepdims=True) * rows
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    angle = 2 * np.arcsin(distance / 2)
    return (np.cos(angle) * rows + np.sin(angle) * noise).astype(np.float32)


def test_quantized_index_finds_near_rows() -> None:
    gallery = np.asfortranarray(_unit_rows(20_000, 128, seed=1))
    targets = np.arange(0, 20_000, 100)
    probes = _probes_near(gallery[targets], distance=0.7, seed=2)

    index = build_index(gallery, threads=1)
    assert index is not None
    rows, dots = index.search(probes)

    assert index.rows == 20_000
    np.testing.assert_array_equal(rows, targets)
    # The reranking computes the dot product from the float32 row, not from its code.
    exact = np.sum(probes * gallery[targets], axis=1)
    np.testing.assert_allclose(dots, exact, atol=1e-5)


def test_far_probes_get_exact_dots() -> None:
    gallery = _unit_rows(5_000, 128, seed=3)
    probes = _unit_rows(50, 128, seed=4)

    index = build_index(gallery, threads=1)
    assert index is not None
    rows, dots = index.search(probes)

    assert np.all(rows >= 0)
    np.testing.assert_allclose(dots, np.sum(probes * gallery[rows], axis=1), atol=1e-5)


def test_small_gallery_index_is_exact() -> None:
    gallery = _unit_rows(gallery_index.MIN_QUANTIZED_ROWS - 1, 16, seed=5)
    probes = _unit_rows(40, 16, seed=6)

    index = build_index(gallery, threads=1)
    assert index is not None
    rows, dots = index.search(probes)

    scores = probes @ gallery.T
    np.testing.assert_array_equal(rows, np.argmax(scores, axis=1))
    np.testing.assert_allclose(dots, np.max(scores, axis=1), atol=1e-5)


def test_single_row_gallery() -> None:
    gallery = _unit_rows(1, 128, seed=7)

    index = build_index(gallery, threads=1)
    assert index is not None
    rows, dots = index.search(_unit_rows(3, 128, seed=8))

    np.testing.assert_array_equal(rows, [0, 0, 0])
    assert np.all(np.abs(dots) <= 1.0)


def test_cancelled_build_returns_none() -> None:
    gallery = _unit_rows(3_000, 32, seed=9)

    assert build_index(gallery, threads=1, cancelled=lambda: True) is None


@pytest.mark.parametrize(("dimension", "expected"), [
    (128, 32), (512, 128), (100, 25), (6, 2), (7, 7), (1, 1), (13, 13),
])
def test_subquantizer_count(dimension: int, expected: int) -> None:
    count = subquantizer_count(dimension)

    assert count == expected
    assert dimension % count == 0
    assert dimension // count <= gallery_index.SUBQUANTIZER_DIMENSIONS
