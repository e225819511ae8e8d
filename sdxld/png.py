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

A large image's deflate runs on every core (python-isal's threaded writer, made after pigz:
blocks of 4 MiB deflated side by side, each primed with the 32 KiB before it, into one stream);
that writer frames the stream as gzip, and PNG wants the same deflate data framed as zlib, so
the frame is swapped (`_deflate_on_threads`). On two cores a grainy final's PNG took 0.73-0.98x
the time of one thread's and a flat one 1.00-1.07x (`python bench/host_costs.py`); the gain is
for hosts with more cores, such as the GPU machines' sixteen.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np

try:
    from isal import igzip_threaded
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
# From this many bytes of filtered pixels the deflate runs on several threads: a final (3072x5376:
# 50 MB) and stage 2's image (12 MB), not a stage-1 image (3 MB, on the writer thread already).
# Blocks of 4 MiB were faster than isal's default 1 MiB on two cores (fewer copies and hand-offs).
THREADED_FROM_BYTES = 8 << 20
THREADED_BLOCK_BYTES = 4 << 20
MAX_KEYWORD = 79


def deflate_library() -> str:
    return "isal" if _deflater is not zlib else "zlib"


def encode(image, text: dict[str, str] | None = None, threads: int | None = None) -> bytes:
    """The PNG bytes of a PIL image, with one text chunk per entry of `text` (before the pixels,
    where readers that stop at the image data still find them): tEXt when the value is ASCII (what
    most viewers read), iTXt (UTF-8) otherwise. `threads`: for the deflate of a large image
    (default: the cores this process may use)."""
    text = text or {}
    if image.width == 0 or image.height == 0:
        raise ValueError(f"cannot write an empty image ({image.width}x{image.height}) as PNG")
    if image.mode not in COLOR_TYPES or "transparency" in image.info:
        return _pillow_encode(image, text)
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[image.mode], 0, 0, 0)
    compressed = deflate(up_filtered(pixels), threads)
    out = [SIGNATURE, chunk(b"IHDR", header)]
    if image.info.get("icc_profile"):
        # A colour profile the image came with (Pillow keeps it through convert and resize) stays
        # with it, as Pillow's writer kept it.
        out.append(chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(image.info["icc_profile"])))
    out += [text_chunk(key, value) for key, value in text.items()]
    out += [chunk(b"IDAT", compressed[start:start + IDAT_BYTES]) for start in range(0, len(compressed), IDAT_BYTES)]
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def deflate(data: np.ndarray, threads: int | None = None) -> bytes:
    """`data` (C-contiguous bytes) as a zlib stream, what IDAT chunks hold."""
    threads = usable_cores() if threads is None else threads
    if _deflater is zlib or threads < 2 or data.nbytes < THREADED_FROM_BYTES:
        return _deflater.compress(data, DEFLATE_LEVEL)  # a C-contiguous buffer: no copy
    # A thread more than there are blocks would only hold its buffers (a block and a tenth each).
    return _deflate_on_threads(data, min(threads, -(-data.nbytes // THREADED_BLOCK_BYTES)))


def _deflate_on_threads(data: np.ndarray, threads: int) -> bytes:
    """The zlib stream of `data` deflated by isal's threaded gzip writer: its gzip frame (a fixed
    10-byte header, then the CRC-32 and the length) replaced by zlib's (a 2-byte header, then
    the Adler-32), around the same deflate data."""
    buffer = io.BytesIO()
    with igzip_threaded.open(buffer, "wb", compresslevel=DEFLATE_LEVEL, threads=threads,
                             block_size=THREADED_BLOCK_BYTES) as gzip_file:
        gzip_file.write(memoryview(data).cast("B"))
    framed = buffer.getbuffer()
    if bytes(framed[:4]) != b"\x1f\x8b\x08\x00":  # deflate, no optional fields: the header is 10 bytes
        raise RuntimeError(f"isal's threaded writer began its stream with {bytes(framed[:10]).hex()}, not a plain gzip header")
    return b"".join([_ZLIB_HEADER, framed[10:-8], struct.pack(">I", _deflater.adler32(data))])


def usable_cores() -> int:
    """The cores this process may run on (its affinity): the threads a large image's deflate uses."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# zlib's 2-byte header as the deflate library writes it at DEFLATE_LEVEL (the level is only a hint
# in it; readers ignore it).
_ZLIB_HEADER = _deflater.compress(b"", DEFLATE_LEVEL)[:2]


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
