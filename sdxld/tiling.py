"""Tile grids, blend weights, and the latent tiled-denoise loop of stage 3.

Two designs (docs/costs.md says what each costs):
- pixel: each tile is img2img'd on its own and the results are blended with ramps over the
  overlap (generate.py's algorithm). Cheap in memory, but neighbours may draw different things
  where they overlap.
- latent: at every denoising step the UNet predicts noise for each latent tile, the predictions
  are fused with per-tile weights, and ONE scheduler step runs over the whole latent (Mixture of
  Diffusers / MultiDiffusion). Tiles cannot diverge, because there is only one image state.

Grid and weights are plain numpy and need no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class Tile:
    x: int
    y: int
    width: int
    height: int

    @property
    def region(self) -> tuple:
        """Index of this tile in an (N, C, H, W) tensor."""
        return (slice(None), slice(None), slice(self.y, self.y + self.height), slice(self.x, self.x + self.width))

    def scaled(self, factor: int) -> "Tile":
        return Tile(self.x // factor, self.y // factor, self.width // factor, self.height // factor)


TILE_FITS = ("grow_overlap", "shrink_tiles")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length): stride tile - overlap, the last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_spans(length: int, tile: int, overlap: int, fit: str = "grow_overlap") -> list[tuple[int, int]]:
    """(start, size) of each tile along one side. grow_overlap: tiles of `tile` pixels, the last
    flush with the end, so the spare length widens the overlaps (3072 px in two 2048 tiles overlap
    by 1024). shrink_tiles: as many tiles, shrunk to the smallest size (a multiple of 64 where it
    fits, of 8 always) whose even spacing keeps every overlap at least `overlap`: the same tiles'
    worth of context with less of the image computed twice."""
    starts = tile_starts(length, tile, overlap)
    count = len(starts)
    if fit == "grow_overlap" or count == 1:
        return [(start, min(tile, length)) for start in starts]
    needed = -(-(length + (count - 1) * overlap) // count)  # count tiles overlapping by `overlap` exactly

    def round_up(value: int, step: int) -> int:
        return -(-value // step) * step

    size = round_up(needed, 64)
    if size > tile:
        size = round_up(needed, 8)
    while size < tile:  # starts on the 8-pixel grid may cut an overlap short by a few pixels: grow to keep it
        spaced = [(index * (length - size) // (count - 1)) // 8 * 8 for index in range(count)]
        if all(size - (b - a) >= overlap for a, b in zip(spaced, spaced[1:])):
            return [(start, size) for start in spaced]
        size += 8
    return [(start, min(tile, length)) for start in starts]


def tile_grid(width: int, height: int, tile: int, overlap: int, fit: str = "grow_overlap") -> list[Tile]:
    """Tiles row by row, all of one size, never larger than the image or `tile`, edges flush;
    `fit` as in tile_spans."""
    return [
        Tile(x, y, tile_width, tile_height)
        for y, tile_height in tile_spans(height, tile, overlap, fit)
        for x, tile_width in tile_spans(width, tile, overlap, fit)
    ]


def _ramp(size: int, overlap: int, rise: bool, fall: bool, mode: str) -> np.ndarray:
    """1D weight: 1 in the middle, ramping over `overlap` on the sides that have a neighbour.
    Never 0 (half-sample offset), so a pixel covered only by a ramp still gets its value."""
    weight = np.ones(size, dtype=np.float64)
    n = min(overlap, size // 2)
    if n <= 0:
        return weight
    t = (np.arange(n) + 0.5) / n
    ramp = t if mode == "linear" else 0.5 - 0.5 * np.cos(np.pi * t)
    if rise:
        weight[:n] = ramp
    if fall:
        weight[size - n :] = ramp[::-1]
    return weight


def ramp_weights(tile: Tile, width: int, height: int, overlap: int, mode: str) -> np.ndarray:
    """2D blend weights (height x width) of one tile for pixel mode: cosine or linear ramps
    toward inner neighbours, flat at the image border."""
    wx = _ramp(tile.width, overlap, tile.x > 0, tile.x + tile.width < width, mode)
    wy = _ramp(tile.height, overlap, tile.y > 0, tile.y + tile.height < height, mode)
    return np.outer(wy, wx)


def gaussian_weights(width: int, height: int, sigma: float = 0.3) -> np.ndarray:
    """Mixture-of-Diffusers style weights: a Gaussian over the tile, highest in the middle."""
    def axis(n: int) -> np.ndarray:
        x = (np.arange(n) + 0.5) / n - 0.5
        return np.exp(-(x**2) / (2 * sigma**2))

    return np.outer(axis(height), axis(width))


def blend(tiles: list[tuple[Tile, np.ndarray]], width: int, height: int, overlap: int, mode: str) -> np.ndarray:
    """Weighted average of HxWxC float tile images into one image (pixel mode)."""
    channels = tiles[0][1].shape[2]
    total = np.zeros((height, width, channels), dtype=np.float64)
    weights = np.zeros((height, width, 1), dtype=np.float64)
    for tile, pixels in tiles:
        w = ramp_weights(tile, width, height, overlap, mode)[..., None]
        total[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] += pixels * w
        weights[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] += w
    return total / weights


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def fuse(predictions, latent_tiles: list[Tile], weights, shape):
    """Weighted average of per-tile tensors (N,C,h,w) into one (1,C,H,W) tensor (latent mode)."""
    import torch

    first = predictions[0]
    total = torch.zeros(shape, dtype=torch.float32, device=first.device)
    norm = torch.zeros((1, 1, *shape[2:]), dtype=torch.float32, device=first.device)
    for prediction, tile, weight in zip(predictions, latent_tiles, weights):
        total[tile.region] += prediction.float() * weight
        norm[tile.region] += weight
    return total / norm


@dataclass
class Conditioning:
    """Everything a UNet call needs besides the latent: text embeddings and SDXL time ids per tile."""

    unet: object
    prompt_embeds: object  # (2, seq, dim): negative then positive (classifier-free guidance)
    pooled: object  # (2, dim)
    time_ids: Callable  # tile -> (2, n) time ids for that tile
    guidance: float


def guided_noise(cond: Conditioning, model_input, t, latent_tiles: list[Tile], pixel_tiles: list[Tile]):
    """Classifier-free-guided noise predictions of a batch of tiles, one UNet call: (N, C, h, w)."""
    import torch

    n = len(latent_tiles)
    x = torch.cat([model_input[tile.region] for tile in latent_tiles])
    x = torch.cat([x, x]).to(cond.unet.dtype)  # all negatives, then all positives
    embeds = torch.cat([cond.prompt_embeds[0:1].expand(n, -1, -1), cond.prompt_embeds[1:2].expand(n, -1, -1)])
    pooled = torch.cat([cond.pooled[0:1].expand(n, -1), cond.pooled[1:2].expand(n, -1)])
    ids = [cond.time_ids(tile) for tile in pixel_tiles]
    time_ids = torch.cat([torch.cat([i[0:1] for i in ids]), torch.cat([i[1:2] for i in ids])])
    noise = cond.unet(x, t, encoder_hidden_states=embeds,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
    uncond, text = noise.chunk(2)
    return uncond + cond.guidance * (text - uncond)


def whole_latent_noise(cond: Conditioning, model_input, t, latent_tiles, pixel_tiles, weights, tile_batch: int):
    """The noise prediction of the whole latent, fused from its tiles' (tile_batch tiles per UNet call)."""
    predictions = []
    for group in batches(list(range(len(latent_tiles))), tile_batch):
        guided = guided_noise(cond, model_input, t, [latent_tiles[i] for i in group], [pixel_tiles[i] for i in group])
        predictions.extend(guided[j : j + 1] for j in range(len(group)))
    return fuse(predictions, latent_tiles, weights, tuple(model_input.shape))


def tiled_denoise(
    latents,
    timesteps: list,
    scheduler,
    phases: list[tuple[int, Conditioning]],
    latent_tiles: list[Tile],
    pixel_tiles: list[Tile],
    tile_batch: int,
    on_step: Callable[[int, int], bool],
    step_kwargs: dict | None = None,
):
    """The MultiDiffusion loop: each step, one noise prediction of the whole latent from its tiles,
    then one scheduler step for the whole latent.

    `phases` are (first step index, conditioning): the base UNet, then optionally the refiner's
    from the handoff step on. `on_step(step, total)` returns True to stop early. `step_kwargs`
    go to every scheduler step (the generator of ancestral samplers).
    """
    import torch

    from .host_waits import queued_copy

    weights = [queued_copy(torch.from_numpy(gaussian_weights(t.width, t.height)).float(), latents.device)
               for t in latent_tiles]
    for index, t in enumerate(timesteps):
        cond = [c for start, c in phases if start <= index][-1]
        model_input = scheduler.scale_model_input(latents, t)
        noise = whole_latent_noise(cond, model_input, t, latent_tiles, pixel_tiles, weights, tile_batch)
        latents = scheduler.step(noise.to(latents.dtype), t, latents, **(step_kwargs or {}), return_dict=False)[0]
        if on_step(index + 1, len(timesteps)):
            break
    return latents


def unet_calls(tiles: int, tile_batch: int, steps: int) -> int:
    """UNet evaluations the latent loop makes (CFG halves share a call)."""
    return math.ceil(tiles / tile_batch) * steps
