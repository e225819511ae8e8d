"""esrgan.lanczos: Pillow's Lanczos resize run on a tensor gives Pillow's pixels, exactly."""

import random

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from esrgan import lanczos


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pillow_resize(pixels: np.ndarray, size) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


SIZES = [
    ((768, 1344), (384, 672)),  # the default final's geometry (6144x10752 -> 3072x5376) at 1/8
    ((96, 168), (128, 224)),  # up on both axes
    ((300, 400), (157, 211)),  # factors that are not whole
    ((40, 300), (39, 100)),  # the height loses more than twice the width's pixels: rows first on Pillow 13
    ((50, 70), (500, 21)),  # up on one axis, down on the other
    ((7, 9), (3, 2)), ((1, 5), (1, 2)), ((5, 1), (2, 1)), ((2, 2), (1, 1)),  # windows wider than the image
]


@pytest.mark.parametrize("in_size, out_size", SIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in SIZES])
def test_pixels_equal_pillows(in_size, out_size):
    pixels = noise(*in_size, seed=sum(in_size + out_size))
    got = lanczos.resize(torch.from_numpy(pixels), out_size).numpy()
    assert np.array_equal(got, pillow_resize(pixels, out_size))


def test_pixels_equal_pillows_on_a_sweep_of_sizes_that_takes_both_pass_orders():
    rng = random.Random(5)
    orders = set()
    for case in range(120):
        in_size = (rng.randint(1, 90), rng.randint(1, 90))
        out_size = (rng.randint(1, 140), rng.randint(1, 140))
        pixels = noise(*in_size, seed=case)
        got = lanczos.resize(torch.from_numpy(pixels), out_size).numpy()
        assert np.array_equal(got, pillow_resize(pixels, out_size)), (in_size, out_size)
        if in_size[0] != out_size[0] and in_size[1] != out_size[1]:
            orders.add(lanczos.vertical_pass_first(in_size, out_size))
    assert orders == {True, False} or int(PIL.__version__.split(".")[0]) < 13


def test_the_pass_order_matters_and_follows_the_pillow_release():
    # Pillow 13: rows first when the height loses more than twice the width's pixels.
    assert lanczos.vertical_pass_first((40, 300), (39, 100), "13.0.0")
    assert not lanczos.vertical_pass_first((6144, 10752), (3072, 5376), "13.0.0")
    assert not lanczos.vertical_pass_first((100, 100), (100, 150), "13.0.0")
    # 12.2 and 12.3: only images over 100 times taller than wide; before: never.
    assert not lanczos.vertical_pass_first((40, 300), (39, 100), "12.3.0")
    assert lanczos.vertical_pass_first((2, 300), (3, 100), "12.2.0")
    assert not lanczos.vertical_pass_first((2, 300), (3, 100), "11.3.0")
    # The order changes pixels: the other order would not be Pillow's.
    pixels = torch.from_numpy(noise(40, 300, seed=1))
    rows_first = lanczos._resample_axis(lanczos._resample_axis(pixels, 0, 100), 1, 39)
    columns_first = lanczos._resample_axis(lanczos._resample_axis(pixels, 1, 39), 0, 100)
    assert not torch.equal(rows_first, columns_first)


def test_bands_give_the_same_pixels_as_one_piece(monkeypatch):
    pixels = torch.from_numpy(noise(200, 120, seed=3))
    whole = lanczos.resize(pixels, (90, 70))
    monkeypatch.setattr(lanczos, "BAND_ELEMENTS", 1000)  # a band of a few lines
    assert torch.equal(lanczos.resize(pixels, (90, 70)), whole)


def test_weights_are_pillows_fixed_point():
    starts, weights = lanczos.axis_weights(6144, 3072)
    assert weights.shape == (3072, 13)  # support 3 at scale 2: 13 taps
    # Every output pixel's weights sum to one in 22-bit fixed point, give or take rounding.
    assert np.all(np.abs(weights.sum(axis=1) - (1 << 22)) <= 13)
    # The last window (centre 6143, six pixels each side) is cut by the image's edge.
    assert starts[0] == 0 and starts[-1] == 6137 and np.count_nonzero(weights[-1]) == 7
