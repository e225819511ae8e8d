"""What tiling costs in FLOPs: the SDXL VAE tiled or whole, the upscaler's tiles or the whole image,
stage 3's tile grids.

Counted with torch.utils.flop_counter through the code sdxld runs (diffusers' tiled encode and
decode; `esrgan.Upscaler`'s tile loop; `tiling.tile_grid`), on SDXL's VAE and UNet and an
anime_6B-shaped ESRGAN built on the meta device: exact counts for those architectures, no weights, no GPU, a few seconds on a CPU.
FLOPs are not seconds (a GPU's speed also depends on the shapes), but they say what a change can
at most win, and where the whole image costs more than its tiles.

    python bench/tiling_cost.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {"stage 1": (768, 1344), "stage 2": (1536, 2688), "stage 3": (3072, 5376)}


def teraflops(run) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e12


def vae_rows() -> list[str]:
    import torch
    from diffusers import AutoencoderKL

    from gpu import SDXL_VAE

    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE).to(torch.bfloat16)
    rows = ["| VAE at | decode tiled / whole (TFLOP) | encode tiled / whole | tiled / whole |", "|---|---:|---:|---:|"]
    for stage, (width, height) in SIZES.items():
        latent = torch.empty(1, 4, height // 8, width // 8, device="meta", dtype=torch.bfloat16)
        pixels = torch.empty(1, 3, height, width, device="meta", dtype=torch.bfloat16)
        counts = {}
        for tiled in (True, False):
            # diffusers' own tiles (1024 px, a quarter overlapped): what memory.vae_tiling gives.
            vae.enable_tiling() if tiled else vae.disable_tiling()
            # Stage 1 only decodes; stages 2 and 3 encode their input and decode the result.
            encode = teraflops(lambda: vae.encode(pixels)) if stage != "stage 1" else 0.0
            counts[tiled] = (teraflops(lambda: vae.decode(latent)), encode)
        (dec_t, enc_t), (dec_w, enc_w) = counts[True], counts[False]
        encodes = f"{enc_t:.1f} / {enc_w:.1f}" if enc_t else "(none)"
        rows.append(f"| {stage}, {width}x{height} | {dec_t:.1f} / {dec_w:.1f} | {encodes} | "
                    f"{(dec_t + enc_t) / (dec_w + enc_w):.2f} |")
    return rows


def upscaler_rows() -> list[str]:
    import numpy as np
    from spandrel import ModelLoader
    from spandrel.architectures.ESRGAN import ESRGAN

    from esrgan import Upscaler

    # Real weights' shapes give spandrel the architecture; the FLOPs are counted on a meta copy.
    state = ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=6, scale=4).state_dict()
    descriptor = ModelLoader().load_from_state_dict(state)
    descriptor.model.to("meta")
    width, height = SIZES["stage 2"]
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    rows = [f"| upscaler (anime_6B-shaped) on {width}x{height}, tile/pad | TFLOP | / whole image |", "|---|---:|---:|"]
    whole = None
    for tile, pad in ((None, 0), (512, 32), (768, 32), (1024, 32), (2048, 32)):
        upscaler = Upscaler(descriptor, "anime_6B-shaped", tile or 512, pad, device="meta", dtype_name="fp32")
        flops = teraflops(lambda: upscaler._network_output(pixels, tiled=tile is not None, where="meta"))
        whole = whole or flops
        label = "whole image" if tile is None else f"{tile}/{pad}" + (" (default)" if (tile, pad) == (512, 32) else "")
        rows.append(f"| {label} | {flops:.1f} | {flops / whole:.2f} |")
    return rows


def stage3_grid_rows() -> list[str]:
    """The UNet's work per stage-3 step (CFG pair, every tile) for each generation.stage3.tile_fit."""
    import torch
    from diffusers import UNet2DConditionModel

    from gpu import SDXL_UNET
    from sdxld.tiling import TILE_FITS, tile_grid

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)

    def unet_step(width: int, height: int) -> float:
        meta = {"device": "meta", "dtype": torch.bfloat16}
        conditions = {"text_embeds": torch.empty(2, 1280, **meta), "time_ids": torch.empty(2, 6, **meta)}
        return teraflops(lambda: unet(torch.empty(2, 4, height // 8, width // 8, **meta), torch.tensor(500, device="meta"),
                                      encoder_hidden_states=torch.empty(2, 77, 2048, **meta), added_cond_kwargs=conditions))

    width, height = SIZES["stage 3"]
    rows = [f"| stage 3 at {width}x{height}, tile 2048 / overlap 256 | tiles | megapixels through the UNet | TFLOP per step | / grow_overlap |",
            "|---|---:|---:|---:|---:|"]
    first = None
    for fit in TILE_FITS:
        tiles = tile_grid(width, height, 2048, 256, fit)
        flops = len(tiles) * unet_step(tiles[0].width, tiles[0].height)
        first = first or flops
        rows.append(f"| {fit}: {tiles[0].width}x{tiles[0].height} | {len(tiles)} | "
                    f"{sum(t.width * t.height for t in tiles) / 1e6:.1f} | {flops:.0f} | {flops / first:.2f} |")
    return rows


def main() -> None:
    from sdxld.models import quiet_libraries

    quiet_libraries()
    print("\n".join(vae_rows()))
    print()
    print("\n".join(upscaler_rows()))
    print()
    print("\n".join(stage3_grid_rows()))


if __name__ == "__main__":
    main()
