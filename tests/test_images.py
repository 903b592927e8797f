"""Image decoding: every odd file either decodes to upright RGB or raises a named error."""

from __future__ import annotations

import io
import os
import subprocess
import sys
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


def _jpeg_with_size(width: int, height: int, fill_bytes: int) -> bytes:
    """A small JPEG whose SOF0 claims width x height, with 0xFF fill bytes before SOF0."""
    data = _encode_pil(Image.fromarray(_gradient()), "JPEG")
    sof = data.index(b"\xff\xc0")
    patched = bytearray(data)
    patched[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(patched[:sof]) + b"\xff" * fill_bytes + bytes(patched[sof:])


def test_fill_bytes_before_sof_still_checked() -> None:
    data = _jpeg_with_size(32767, 32767, fill_bytes=1)

    with pytest.raises(ImageError, match="fill.jpg: image is 32767x32767 pixels"):
        decode_image(data, "fill.jpg")


def test_fill_bytes_in_valid_jpeg_decode() -> None:
    data = _jpeg_with_size(80, 60, fill_bytes=3)

    assert decode_image(data, "fill.jpg").shape == (60, 80, 3)


def test_opencv_pixel_cap_set_before_import() -> None:
    # OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 loads, so this needs
    # a fresh interpreter in which agent.images is the first module to import cv2.
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    code = "import os, agent.images; print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)

    assert result.stdout.strip() == "100000000"


def test_opencv_pixel_cap_raises_image_error() -> None:
    # With a 100-pixel cap, a 20x20 BMP (a format whose header is not parsed here)
    # hits OpenCV's own check, which raises cv2.error instead of returning None.
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="100")
    code = (
        "import cv2, numpy as np\n"
        "from agent.images import ImageError, decode_image\n"
        "ok, bmp = cv2.imencode('.bmp', np.zeros((20, 20, 3), np.uint8))\n"
        "try:\n"
        "    decode_image(bmp.tobytes(), 'big.bmp')\n"
        "except ImageError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True)

    assert result.stdout.startswith("big.bmp: OpenCV rejected the image before decoding it")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_data_after_end_marker_decodes(fmt: str) -> None:
    # Motion photos append an MP4 after the JPEG's EOI; Samsung phones append a trailer.
    data = _encode_pil(Image.fromarray(_gradient()), fmt)
    trailer = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 16

    decoded = decode_image(data + trailer, "motion." + fmt.lower())

    assert decoded.shape == (60, 80, 3)


def test_truncated_jpeg_with_thumbnail_rejected() -> None:
    # The EXIF thumbnail is a whole JPEG, EOI included, inside APP1 before SOS.
    thumbnail = Image.fromarray(_gradient(16, 20))
    exif = Image.Exif()
    exif[0x0112] = 1
    photo = Image.fromarray(_gradient(600, 800))
    thumb_bytes = _encode_pil(thumbnail, "JPEG")
    data = _encode_pil(photo, "JPEG", exif=exif.tobytes() + thumb_bytes)
    thumbnail_end = data.index(thumb_bytes) + len(thumb_bytes)
    cut = data[: len(data) * 2 // 3]
    assert thumbnail_end < data.rindex(b"\xff\xda") < len(cut)

    with pytest.raises(ImageError, match="thumb.jpg: truncated JPEG"):
        decode_image(cut, "thumb.jpg")


def test_truncated_png_with_trailing_chunk_rejected() -> None:
    # IEND's bytes appear in the cut file's tail only as data of a later chunk.
    data = _encode_pil(Image.fromarray(_gradient()), "PNG")
    iend = data.index(b"IEND") - 4
    text_chunk = b"\x00\x00\x00\x0ctEXtIEND\xaeB`\x82 abc" + b"\x00" * 4
    cut = data[:iend] + text_chunk

    with pytest.raises(ImageError, match="cut.png: truncated PNG"):
        decode_image(cut, "cut.png")
