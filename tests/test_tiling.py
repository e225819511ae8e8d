"""Tile grids and blending: exact cover, flush edges, identity blends, fused predictions."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxld.tiling import TILE_FITS, Tile, blend, fuse, gaussian_weights, ramp_weights, tile_grid, tile_starts, unet_calls


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(8, 1200).map(lambda v: v * 8),
    height=st.integers(8, 1200).map(lambda v: v * 8),
    tile=st.integers(8, 512).map(lambda v: v * 8),
    overlap_fraction=st.floats(0, 0.49),
    fit=st.sampled_from(TILE_FITS),
)
def test_grids_cover_exactly_with_flush_edges(width, height, tile, overlap_fraction, fit):
    overlap = int(tile * overlap_fraction) // 8 * 8
    tiles = tile_grid(width, height, tile, overlap, fit)
    covered = np.zeros((height, width), dtype=bool)
    for t in tiles:
        assert t.x >= 0 and t.y >= 0 and t.x + t.width <= width and t.y + t.height <= height
        assert t.x % 8 == 0 and t.y % 8 == 0 and t.width % 8 == 0 and t.height % 8 == 0
        covered[t.y : t.y + t.height, t.x : t.x + t.width] = True
    assert covered.all()
    assert max(t.x + t.width for t in tiles) == width
    assert max(t.y + t.height for t in tiles) == height
    # One tile size (latent tiles are batched), never above `tile`; as many tiles either way.
    assert len({(t.width, t.height) for t in tiles}) == 1
    assert tiles[0].width <= min(tile, width) and tiles[0].height <= min(tile, height)
    assert len(tiles) == len(tile_grid(width, height, tile, overlap))
    if fit == "grow_overlap":  # the grid finals were always made with
        assert tiles[0].width == min(tile, width) and tiles[0].height == min(tile, height)
        assert sorted({t.x for t in tiles}) == tile_starts(width, tile, overlap)
        assert sorted({t.y for t in tiles}) == tile_starts(height, tile, overlap)
    # Neighbours overlap by at least the requested amount, and no two tiles start at the same place.
    for starts, size in (({t.x for t in tiles}, tiles[0].width), ({t.y for t in tiles}, tiles[0].height)):
        starts = sorted(starts)
        assert all(size - (b - a) >= overlap for a, b in zip(starts, starts[1:]))
    assert len({(t.x, t.y) for t in tiles}) == len(tiles)


def test_default_final_size_is_six_tiles():
    """3072x5376 with 2048-pixel tiles and 256 overlap: 2 columns x 3 rows."""
    tiles = tile_grid(3072, 5376, 2048, 256)
    assert len(tiles) == 6
    assert tile_starts(3072, 2048, 256) == [0, 1024]
    assert tile_starts(5376, 2048, 256) == [0, 1792, 3328]


def test_shrunk_tiles_at_the_default_size_compute_a_fifth_less_of_the_image_twice():
    """The same six tiles, 1664x1984 instead of 2048x2048: overlaps of 256 and 288 pixels instead
    of 1024 and 256-464; 19.8 instead of 25.2 megapixels through the UNet at each step."""
    tiles = tile_grid(3072, 5376, 2048, 256, "shrink_tiles")
    assert [(t.x, t.y) for t in tiles] == [(0, 0), (1408, 0), (0, 1696), (1408, 1696), (0, 3392), (1408, 3392)]
    assert {(t.width, t.height) for t in tiles} == {(1664, 1984)}
    assert sum(t.width * t.height for t in tiles) / sum(t.width * t.height for t in tile_grid(3072, 5376, 2048, 256)) < 0.79


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(4, 60).map(lambda v: v * 8),
    height=st.integers(4, 60).map(lambda v: v * 8),
    tile=st.integers(4, 24).map(lambda v: v * 8),
    overlap=st.integers(0, 8).map(lambda v: v * 8),
    mode=st.sampled_from(["cosine", "linear"]),
)
def test_blending_unchanged_tiles_gives_back_the_image_exactly(width, height, tile, overlap, mode):
    overlap = min(overlap, tile // 2 - 8) if tile > 16 else 0
    image = np.random.default_rng(width * height).integers(0, 256, (height, width, 3)).astype(np.float64)
    tiles = [(t, image[t.y : t.y + t.height, t.x : t.x + t.width]) for t in tile_grid(width, height, tile, max(overlap, 0))]
    blended = blend(tiles, width, height, max(overlap, 0), mode)
    assert np.array_equal(np.round(blended).astype(np.uint8), image.astype(np.uint8))


def test_ramps_rise_toward_neighbours_and_stay_flat_at_image_borders():
    weights = ramp_weights(Tile(0, 0, 64, 64), 128, 64, 16, "cosine")
    assert weights.min() > 0
    assert np.all(weights[:, :48] == 1.0)  # image border on the left, top and bottom
    assert np.all(np.diff(weights[0, 48:]) < 0)  # falls toward the right neighbour
    linear = ramp_weights(Tile(64, 0, 64, 64), 128, 64, 16, "linear")
    assert np.allclose(np.diff(linear[0, :16]), 1 / 16)


def test_fusing_identical_predictions_gives_that_prediction():
    shape = (1, 4, 24, 40)
    prediction = torch.randn(shape)
    tiles = [t.scaled(8) for t in tile_grid(320, 192, 128, 32)]
    crops = [prediction[:, :, t.y : t.y + t.height, t.x : t.x + t.width] for t in tiles]
    weights = [torch.from_numpy(gaussian_weights(t.width, t.height)).float() for t in tiles]
    assert torch.allclose(fuse(crops, tiles, weights, shape), prediction, atol=1e-6)


def test_fusion_weights_each_tile_by_its_gaussian():
    shape = (1, 1, 8, 12)
    tiles = [Tile(0, 0, 8, 8), Tile(4, 0, 8, 8)]
    weights = [torch.from_numpy(gaussian_weights(8, 8)).float() for _ in tiles]
    fused = fuse([torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)], tiles, weights, shape)
    assert torch.all(fused[..., :4] == 0) and torch.all(fused[..., 8:] == 1)
    middle = fused[0, 0, 4, 4:8]
    assert torch.all((middle > 0) & (middle < 1)) and torch.all(torch.diff(middle) > 0)


def test_unet_call_count_formula():
    assert unet_calls(tiles=6, tile_batch=4, steps=7) == 14
    assert unet_calls(tiles=6, tile_batch=1, steps=7) == 42
