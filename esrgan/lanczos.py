"""Pillow's Lanczos resize, pixel for pixel, on a torch tensor where it lies (the GPU).

The network's 4x output (6144x10752 for a default final) is brought to the final's size
(3072x5376) by a Lanczos resize. Pillow does it on one CPU core in ~0.7 s, after the 200 MB
image has crossed from the GPU; here it runs where the network left it and 50 MB cross instead.

Why by hand: torch's own antialiased resize (`interpolate(..., antialias=True)`) has no Lanczos,
and its bicubic rounds in float, so finals would change with the machine that made them. This is
Pillow's arithmetic (Resample.c): the same filter taps in double precision, the same 22-bit
fixed-point weights, integer sums, one pass per axis with 8-bit pixels between the passes, and
the same pass order. Pillow picks the order by version, so the order follows the installed Pillow.
`Upscaler` still compares the first image of every size with Pillow itself and keeps Pillow for
that size if they ever differ (a Pillow release that changes its arithmetic).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's: 8-bit pixels times weights summed in a 32-bit int
LANCZOS_SUPPORT = 3.0
# Elements of one int32 accumulator (the image is resized in bands of about this many values):
# 128 MiB of VRAM, whatever the image size.
BAND_ELEMENTS = 32 * 1024 * 1024


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -LANCZOS_SUPPORT <= x < LANCZOS_SUPPORT:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


@lru_cache(maxsize=16)
def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel along one axis: the first input pixel it reads and its fixed-point
    weights (out_size x taps, zero-padded). Computed in Python's doubles and libm's sin, as
    Pillow's precompute_coeffs and normalize_coeffs_8bpc compute them, in the same order."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    inverse_filterscale = 1.0 / filterscale
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.int32)
    one = 1 << PRECISION_BITS
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - first
        kernel = [_lanczos((x + first - center + 0.5) * inverse_filterscale) for x in range(count)]
        total = 0.0
        for value in kernel:
            total += value
        if total != 0.0:
            kernel = [value / total for value in kernel]
        starts[out] = first
        weights[out, :count] = [int(-0.5 + value * one) if value < 0 else int(0.5 + value * one) for value in kernel]
    return starts, weights


def vertical_pass_first(in_size: tuple[int, int], out_size: tuple[int, int], pillow_version: str | None = None) -> bool:
    """Whether the installed Pillow resamples rows (the vertical pass) before columns.

    Pillow 13 runs the vertical pass first when the height loses more than twice as many pixels
    as the width (Resample.c); 12.2 and 12.3 did so only for images over 100 times taller than
    wide (Image.resize); earlier releases always ran the horizontal pass first."""
    if pillow_version is None:
        import PIL

        pillow_version = PIL.__version__
    major, minor = (int(part) for part in pillow_version.split(".")[:2])
    (in_width, in_height), (out_width, out_height) = in_size, out_size
    if major >= 13:
        lost_height = in_height - out_height
        return lost_height > 0 and lost_height > (in_width - out_width) * 2
    if (major, minor) >= (12, 2):
        return in_height > in_width * 100 and out_height < in_height
    return False


def resize(pixels, size: tuple[int, int]):
    """HxWxC uint8 tensor -> the same resized to `size` (width, height) as Pillow's
    `Image.resize(size, Image.LANCZOS)` would, on the tensor's device."""
    width, height = size
    in_size = (pixels.shape[1], pixels.shape[0])
    passes = [(0, height), (1, width)]
    if not vertical_pass_first(in_size, size):
        passes.reverse()
    for axis, out_size in passes:
        if pixels.shape[axis] != out_size:
            pixels = _resample_axis(pixels, axis, out_size)
    return pixels


def _resample_axis(pixels, axis: int, out_size: int):
    """One Pillow pass along `axis` (0: rows, 1: columns) of an HxWxC uint8 tensor."""
    import torch

    in_size = pixels.shape[axis]
    starts, weights = axis_weights(in_size, out_size)
    taps = weights.shape[1]
    device = pixels.device
    # A window that starts near the edge has zero weights past it: clamp those indexes in.
    index = torch.from_numpy(np.minimum(starts[:, None] + np.arange(taps)[None, :], in_size - 1)).to(device)
    weight = torch.from_numpy(weights).to(device)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = out_size
    used_taps = [tap for tap in range(taps) if weights[:, tap].any()]

    out_shape = list(pixels.shape)
    out_shape[axis] = out_size
    out = torch.empty(out_shape, dtype=torch.uint8, device=device)
    # Bands along the other spatial axis are independent: bounded memory for any image size.
    other = 1 - axis
    per_line = out_size * pixels.shape[2]
    band = max(1, BAND_ELEMENTS // per_line)
    for begin in range(0, pixels.shape[other], band):
        source = pixels.narrow(other, begin, min(band, pixels.shape[other] - begin))
        accumulator = None
        for tap in used_taps:
            term = source.index_select(axis, index[:, tap]).to(torch.int32).mul_(weight[:, tap].view(weight_shape))
            accumulator = term if accumulator is None else accumulator.add_(term)
        accumulator.add_(1 << (PRECISION_BITS - 1))
        # Pillow's clip8: an arithmetic shift (floor), then 0..255.
        out.narrow(other, begin, source.shape[other]).copy_(accumulator.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255))
    return out
