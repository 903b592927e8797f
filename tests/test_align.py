"""Crop and prewhitening, checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from agent.align import crop_face, prewhiten
from agent.embed import l2_normalize


def test_prewhiten_matches_formula() -> None:
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)  # values 0..11

    result = prewhiten(image)

    # mean 5.5, population std sqrt(143/12) = 3.4521
    expected = (np.arange(12, dtype=np.float64) - 5.5) / np.sqrt(143 / 12)
    assert result.dtype == np.float32
    assert np.allclose(result.ravel(), expected, atol=1e-5)


def test_prewhiten_flat_image_uses_std_floor() -> None:
    flat = np.full((1, 4, 4, 3), 200, dtype=np.uint8)

    result = prewhiten(flat)

    assert np.all(np.isfinite(result))
    assert np.all(result == 0)


def test_prewhiten_treats_images_separately() -> None:
    dark = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    dark[0, 0, 0, 0] = 12
    batch = np.concatenate([dark, dark * 10])

    result = prewhiten(batch)

    assert np.allclose(result[0], result[1], atol=1e-5)


def test_crop_adds_margin_and_resizes() -> None:
    image = np.zeros((100, 100, 3), dtype=np.uint8)
    image[40:60, 40:60] = 255  # a white 20x20 square

    crop = crop_face(image, np.array([40, 40, 60, 60], dtype=np.float32), margin=1.0, size=40)

    # A margin of 1.0 doubles the box to 40x40 around the square, so the square
    # fills the middle half of the crop at scale 1.
    assert crop.shape == (40, 40, 3)
    assert crop[20, 20].tolist() == [255, 255, 255]
    assert crop[5, 5].tolist() == [0, 0, 0]
    assert crop[11:29, 11:29].min() == 255


def test_crop_clips_at_image_border() -> None:
    image = np.full((50, 50, 3), 9, dtype=np.uint8)

    crop = crop_face(image, np.array([-10, -10, 20, 20], dtype=np.float32), 0.2, 16)

    assert crop.shape == (16, 16, 3)
    assert np.all(crop == 9)


def test_crop_outside_image_rejected() -> None:
    image = np.zeros((50, 50, 3), dtype=np.uint8)

    with pytest.raises(ValueError, match="outside the 50x50 image"):
        crop_face(image, np.array([60, 60, 80, 80], dtype=np.float32), 0.2, 16)


def test_l2_normalize_gives_unit_rows() -> None:
    vectors = np.array([[3, 4], [0, 0]], dtype=np.float32)

    result = l2_normalize(vectors)

    assert result[0].tolist() == pytest.approx([0.6, 0.8])
    assert result[1].tolist() == [0, 0]
