"""PNG files written fast enough for a 16-megapixel final, with sdxld's text chunks.

Pillow's PNG writer spends about 2 s on a 3072x5376 final (compress_level 4, one core: half
choosing a filter for every row, half zlib), and that time sits between the last denoising step
and the final appearing, every approved image. Here the filter is numpy's one subtraction (PNG's
"Up" filter for every row) and the deflate is ISA-L's (python-isal; several times zlib's speed at
the same ratio); the result is an ordinary PNG any reader opens, about 0-14 % larger than Pillow's
on the images measured (docs/performance.md, `python bench/host_costs.py`). Without isal the
standard zlib does the deflate (slower, same file).

The container is written by hand because it is four chunk kinds (IHDR, tEXt/iTXt, IDAT, IEND)
and neither Pillow nor the PNG libraries on PyPI take a deflate of our choosing. Images of modes
other than L, RGB and RGBA, or with a transparent colour key (none of sdxld's own), go through
Pillow.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

try:
    from isal import isal_zlib as _deflater
except ImportError:  # a platform without isal wheels: the same stream, from the standard zlib
    _deflater = zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types of the 8-bit modes this writer handles.
COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
UP_FILTER = 2
# Level 1 of either deflate: ISA-L's higher levels (2, 3) made files no smaller on sdxld's images.
DEFLATE_LEVEL = 1
# Pixel data is split over IDAT chunks of this size (a chunk's length field stops at 2^31 - 1).
IDAT_BYTES = 1 << 24
MAX_KEYWORD = 79


def deflate_library() -> str:
    return "isal" if _deflater is not zlib else "zlib"


def encode(image, text: dict[str, str] | None = None) -> bytes:
    """The PNG bytes of a PIL image, with one text chunk per entry of `text` (before the pixels,
    where readers that stop at the image data still find them): tEXt when the value is ASCII (what
    most viewers read), iTXt (UTF-8) otherwise."""
    text = text or {}
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot write an empty image ({image.width}x{image.height}) as PNG")
    if image.mode not in COLOR_TYPES or "transparency" in image.info:
        return _pillow_encode(image, text)
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[image.mode], 0, 0, 0)
    compressed = _deflater.compress(up_filtered(pixels), DEFLATE_LEVEL)  # a C-contiguous buffer: no copy
    out = [SIGNATURE, chunk(b"IHDR", header)]
    if image.info.get("icc_profile"):
        # A colour profile the image came with (Pillow keeps it through convert and resize) stays
        # with it, as Pillow's writer kept it.
        out.append(chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(image.info["icc_profile"])))
    out += [text_chunk(key, value) for key, value in text.items()]
    out += [chunk(b"IDAT", compressed[start:start + IDAT_BYTES]) for start in range(0, len(compressed), IDAT_BYTES)]
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def up_filtered(pixels: np.ndarray) -> np.ndarray:
    """Scanlines as PNG stores them with the Up filter: a filter-type byte, then each byte minus
    the byte above it (mod 256); the first row minus zeros, i.e. itself."""
    height = pixels.shape[0]
    rows = pixels.reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = UP_FILTER
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    return filtered


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunk(key: str, value: str) -> bytes:
    keyword = _keyword(key)
    if value.isascii():
        return chunk(b"tEXt", keyword + b"\0" + value.encode("ascii"))
    # Not compressed, no language tag, no translated keyword.
    return chunk(b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8"))


def _keyword(key: str) -> bytes:
    # PNG keywords are 1-79 Latin-1 printable characters without leading, trailing or double spaces.
    if not (1 <= len(key) <= MAX_KEYWORD) or key != key.strip() or "  " in key or not key.isprintable():
        raise ValueError(f"{key!r} cannot be a PNG text keyword (1-{MAX_KEYWORD} printable characters, no outer spaces)")
    try:
        return key.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{key!r} cannot be a PNG text keyword (Latin-1 only)") from None


def _pillow_encode(image, text: dict[str, str]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        if value.isascii():
            info.add_text(key, value)
        else:
            info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()
