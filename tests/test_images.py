"""Image decoding: every odd file either decodes to upright RGB or raises a named error."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from agent.images import ImageError, decode_image, read_image


def _gradient(height: int = 60, width: int = 80) -> np.ndarray:
    """RGB test card with distinct rows, columns and channels, so rotations show."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 3 % 256, y * 4 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def _encode_pil(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def test_jpeg_decodes_to_rgb() -> None:
    rgb = _gradient()
    data = _encode_pil(Image.fromarray(rgb), "JPEG", quality=95)

    decoded = decode_image(data, "card.jpg")

    assert decoded.shape == (60, 80, 3)
    assert decoded.dtype == np.uint8
    # The red channel grows along x in the card; a BGR mix-up would put it last.
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 4


def test_empty_file_rejected() -> None:
    with pytest.raises(ImageError, match=r"empty.jpg: file is empty \(0 bytes\)"):
        decode_image(b"", "empty.jpg")


def test_truncated_jpeg_rejected() -> None:
    data = _encode_pil(Image.fromarray(_gradient()), "JPEG")

    with pytest.raises(ImageError, match="cut.jpg: truncated JPEG"):
        decode_image(data[: len(data) // 2], "cut.jpg")


def test_truncated_png_rejected() -> None:
    data = _encode_pil(Image.fromarray(_gradient()), "PNG")

    with pytest.raises(ImageError, match="cut.png: truncated PNG"):
        decode_image(data[:-20], "cut.png")


def test_non_image_rejected() -> None:
    with pytest.raises(ImageError, match="notes.jpg: not a decodable image"):
        decode_image(b"these are meeting notes, not a photo\n", "notes.jpg")


def test_grayscale_becomes_three_channels() -> None:
    gray = _gradient()[:, :, 0]
    data = _encode_pil(Image.fromarray(gray, mode="L"), "PNG")

    decoded = decode_image(data, "gray.png")

    assert decoded.shape == (60, 80, 3)
    assert np.array_equal(decoded[:, :, 0], gray)
    assert np.array_equal(decoded[:, :, 2], gray)


def test_rgba_png_drops_alpha() -> None:
    rgb = _gradient()
    alpha = np.full((60, 80, 1), 7, dtype=np.uint8)
    data = _encode_pil(Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA"), "PNG")

    decoded = decode_image(data, "rgba.png")

    assert decoded.shape == (60, 80, 3)
    assert np.array_equal(decoded, rgb)


def test_cmyk_jpeg_converts_to_rgb() -> None:
    rgb = _gradient()
    data = _encode_pil(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)

    decoded = decode_image(data, "cmyk.jpg")

    assert decoded.shape == (60, 80, 3)
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 8


def test_16bit_png_scales_to_8bit() -> None:
    wide = np.zeros((10, 12, 3), dtype=np.uint16)
    wide[:, :, 0] = 65535  # full-scale blue in OpenCV's BGR order
    wide[:, :, 2] = 256 * 100
    ok, encoded = cv2.imencode(".png", wide)
    assert ok

    decoded = decode_image(encoded.tobytes(), "deep.png")

    assert decoded.dtype == np.uint8
    assert decoded[0, 0].tolist() == [100, 0, 255]


def test_exif_rotation_applied() -> None:
    upright = _gradient(60, 80)
    # Orientation 6 means "rotate 90 degrees clockwise to display", so store the
    # pixels rotated 90 degrees counter-clockwise, as a phone held sideways does.
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode_pil(stored, "JPEG", quality=95, exif=exif.tobytes())

    decoded = decode_image(data, "phone.jpg")

    assert decoded.shape == (60, 80, 3)
    assert np.abs(decoded.astype(int) - upright.astype(int)).mean() < 4


def test_tiny_image_decodes() -> None:
    data = _encode_pil(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")

    decoded = decode_image(data, "dot.png")

    assert decoded.shape == (1, 1, 3)
    assert decoded[0, 0].tolist() == [10, 20, 30]


def test_oversized_header_rejected_before_decoding() -> None:
    # A PNG header claiming 20000 x 20000 pixels (400 MP); the body is never read.
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (20000).to_bytes(4, "big") * 2
    data = header + b"\x08\x02\x00\x00\x00" + b"\x00" * 40 + b"IEND\xaeB`\x82"

    with pytest.raises(ImageError, match="bomb.png: image is 20000x20000 pixels"):
        decode_image(data, "bomb.png")


def test_unreadable_path_rejected(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read file"):
        read_image(tmp_path / "missing.jpg")
