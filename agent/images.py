"""Decode image files into RGB uint8 arrays, rejecting bad input with a specific error.

Every photo goes through `decode_image`, whatever the source, so grayscale, RGBA,
CMYK, 16-bit and EXIF-rotated files all reach the detector as HxWx3 RGB uint8.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Refuse files whose header claims more pixels than this before decoding them, so
# a hostile file cannot allocate gigabytes. 8000x6000 (48 MP) is a large phone photo.
MAX_PIXELS = 100_000_000

# A second guard for every format, including those whose header is not parsed here.
# OpenCV 5.1 reads this variable once, when the cv2 module loads, so it must be set
# before the first `import cv2` in the process; agent/__init__.py sets it too, for
# modules that import cv2 before this one.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

# The signatures and trailers below are from the JPEG (ITU T.81) and PNG (RFC 2083)
# specifications. OpenCV decodes a truncated file with a grey bottom half and only
# a libjpeg warning on stderr, so truncation is checked on the bytes first.
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"

# JPEG markers that stand alone, without a length field: TEM, RST0..RST7, SOI, EOI.
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8), 0xD8, 0xD9}
_SOS = 0xDA


class ImageError(ValueError):
    """An input file is not a usable image; the message names the file and why."""


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes into an HxWx3 uint8 RGB array.

    EXIF orientation is applied. Raises ImageError naming `name` for empty,
    truncated, oversized or undecodable data.
    """
    if not data:
        raise ImageError(f"{name}: file is empty (0 bytes); check the source that wrote it")

    _check_pixel_count(data, name)
    _check_not_truncated(data, name)

    buffer = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies the EXIF orientation, drops alpha, expands grayscale to
    # three channels, converts CMYK JPEGs and scales 16-bit PNGs down to 8 bits.
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        # OpenCV raises, rather than returning None, when the header exceeds
        # OPENCV_IO_MAX_IMAGE_PIXELS.
        raise ImageError(
            f"{name}: OpenCV rejected the image before decoding it ({exc.err}); "
            f"images over {MAX_PIXELS} pixels are not accepted"
        ) from exc
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
    # Phones append data after the end marker (motion-photo MP4s, Samsung trailers),
    # so the end marker is looked for where the format puts it, not at the end.
    if data.startswith(JPEG_MAGIC) and not _jpeg_has_end(data):
        raise ImageError(
            f"{name}: truncated JPEG (no end-of-image marker after the scan data); "
            "the file was cut short while copying or writing"
        )
    if data.startswith(PNG_MAGIC) and not _png_has_end(data):
        raise ImageError(
            f"{name}: truncated PNG (the chunks end before the IEND chunk); "
            "the file was cut short while copying or writing"
        )


def _jpeg_has_end(data: bytes) -> bool:
    """Return True when an EOI marker follows the first start-of-scan segment.

    Inside entropy-coded data a 0xFF byte is always followed by 0x00 or an RSTn
    marker, so the first FF D9 after SOS is the image's own EOI. An EXIF
    thumbnail's EOI sits in APP1, before SOS, and is not counted.
    """
    scan = _jpeg_scan_offset(data)
    if scan is None:
        return False
    return data.find(JPEG_END, scan) != -1


def _jpeg_scan_offset(data: bytes) -> int | None:
    """Return the offset just past the first SOS marker, or None when there is none."""
    for offset, marker in _jpeg_markers(data):
        if marker == _SOS:
            return offset + 2
    return None


def _jpeg_markers(data: bytes) -> list[tuple[int, int]]:
    """List (offset, marker) of the segments before the first SOS, in file order.

    Fill bytes (any number of 0xFF before a marker, allowed by ITU T.81 B.1.1.2)
    are skipped. Offsets point at the 0xFF that starts each marker. The walk
    stops at SOS, EOI, a byte that is not a marker, or the end of the data.
    """
    markers: list[tuple[int, int]] = []
    offset = 2
    while offset < len(data):
        if data[offset] != 0xFF:
            break
        while offset + 1 < len(data) and data[offset + 1] == 0xFF:
            offset += 1
        if offset + 1 >= len(data):
            break
        marker = data[offset + 1]
        markers.append((offset, marker))
        if marker in (_SOS, 0xD9):
            break
        if marker in _STANDALONE_MARKERS:
            offset += 2
            continue
        if offset + 4 > len(data):
            break
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        if length < 2:
            break
        offset += 2 + length
    return markers


def _png_has_end(data: bytes) -> bool:
    """Return True when the chunk list reaches a complete IEND chunk."""
    offset = len(PNG_MAGIC)
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        chunk_type = data[offset + 4 : offset + 8]
        end = offset + 12 + length  # length and type, data, then the 4-byte CRC
        if end > len(data):
            return False
        if chunk_type == b"IEND":
            return True
        offset = end
    return False


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
    # The first start-of-frame (SOF0..SOF15 except DHT, JPG and DAC) has the
    # sample precision, then height and width as 16-bit big-endian.
    for offset, marker in _jpeg_markers(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if offset + 9 > len(data):
                return None
            height = int.from_bytes(data[offset + 5 : offset + 7], "big")
            width = int.from_bytes(data[offset + 7 : offset + 9], "big")
            return width, height
    return None
