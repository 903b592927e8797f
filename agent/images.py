"""Decode image files into RGB uint8 arrays, rejecting bad input with a specific error.

Every photo goes through `decode_image`, whatever the source, so grayscale, RGBA,
CMYK, 16-bit and EXIF-rotated files all reach the detector as HxWx3 RGB uint8.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

# The signatures and trailers below are from the JPEG (ITU T.81) and PNG (RFC 2083)
# specifications. OpenCV decodes a truncated file with a grey bottom half and only
# a libjpeg warning on stderr, so truncation is checked on the bytes first.
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"

# Refuse files whose header claims more pixels than this before decoding them, so
# a hostile file cannot allocate gigabytes. 8000x6000 (48 MP) is a large phone photo.
MAX_PIXELS = 100_000_000


class ImageError(ValueError):
    """An input file is not a usable image; the message names the file and why."""


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes into an HxWx3 uint8 RGB array.

    EXIF orientation is applied. Raises ImageError naming `name` for empty,
    truncated, oversized or undecodable data.
    """
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes); check the source that wrote it")

    _check_not_truncated(data, name)
    _check_pixel_count(data, name)

    buffer = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies the EXIF orientation, drops alpha, expands grayscale to
    # three channels, converts CMYK JPEGs and scales 16-bit PNGs down to 8 bits.
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(
            f"{name}: not a decodable image ({len(data)} bytes, starts with {data[:8]!r}); "
            "supported formats are those of OpenCV (JPEG, PNG, BMP, TIFF, WebP)"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: Path) -> np.ndarray:
    """Read and decode the image file at `path`; see `decode_image`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file: {exc.strerror}") from exc
    return decode_image(data, str(path))


def _check_not_truncated(data: bytes, name: str) -> None:
    if data.startswith(JPEG_MAGIC) and JPEG_END not in data[-64:]:
        # Some encoders append padding after the end-of-image marker, hence the window.
        raise ImageError(
            f"{name}: truncated JPEG (no end-of-image marker in the last 64 bytes); "
            "the file was cut short while copying or writing"
        )
    if data.startswith(PNG_MAGIC) and PNG_END not in data[-64:]:
        raise ImageError(
            f"{name}: truncated PNG (no IEND chunk at the end); "
            "the file was cut short while copying or writing"
        )


def _check_pixel_count(data: bytes, name: str) -> None:
    size = _header_size(data)
    if size is None:
        return
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} pixels, over the limit of {MAX_PIXELS} pixels; "
            "downscale it before sending it to the agent"
        )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Return (width, height) from a PNG or JPEG header, or None when it is not found."""
    if data.startswith(PNG_MAGIC) and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")

    if not data.startswith(JPEG_MAGIC):
        return None
    # Walk the JPEG markers to the first start-of-frame (SOF0..SOF15 except DHT,
    # JPG and DAC), whose payload contains height then width as 16-bit big-endian.
    offset = 2
    while offset + 9 < len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(data[offset + 5 : offset + 7], "big")
            width = int.from_bytes(data[offset + 7 : offset + 9], "big")
            return width, height
        offset += 2 + length
    return None
