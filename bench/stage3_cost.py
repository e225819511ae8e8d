"""Stage 3 at the default geometry: pixel mode vs latent mode, counted on the tiny model.

Runs both tiling modes over a 3072x5376 image with the default tile 2048 / overlap 256 /
18 steps / strength 0.4 / refiner split 0.8, and counts with forward hooks what the GPU would do:
UNet calls, tile evaluations (a tile through the UNet once, CFG halves included), VAE pixels
encoded and decoded. The tiny UNet's cost is not SDXL's, so seconds here are not a prediction;
the counts are exact for any model with SDXL's topology. Peak memory is reported as the largest
UNet batch (tiles x 2 for CFG) each mode runs, which is what sets activation memory on a GPU.

    python bench/stage3_cost.py [--size 3072x5376] [--tile-batch 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="3072x5376")
    parser.add_argument("--tile-batch", type=int, default=2)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    import numpy as np
    from PIL import Image

    from sdxld.config import from_dict
    from sdxld.engine import Engine
    from sdxld.stages import stage3_latent, stage3_pixel
    from sdxld.tiny import apply_demo

    root = Path(tempfile.mkdtemp(prefix="sdxld-bench-"))
    try:
        config = apply_demo(from_dict({}, root))
        stage3 = config.generation.stage3
        stage3.steps, stage3.strength, stage3.tile_size, stage3.tile_overlap = 18, 0.4, 2048, 256
        stage3.tile_batch = args.tile_batch
        engine = Engine.load(config)
        record = engine.new_stage1_record(seed=1)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
        models = engine.models

        results = {}
        for mode, run in (("pixel", stage3_pixel), ("latent", stage3_latent)):
            counts = {"unet_calls": 0, "tile_evals": 0, "max_batch": 0, "vae_in": 0, "vae_out": 0}

            def on_unet(module, inputs, kwargs, output):
                batch = inputs[0].shape[0] if inputs else kwargs["sample"].shape[0]
                counts["unet_calls"] += 1
                counts["tile_evals"] += batch // 2
                counts["max_batch"] = max(counts["max_batch"], batch)

            def on_encode(module, inputs, output):
                counts["vae_in"] += inputs[0].shape[-1] * inputs[0].shape[-2]

            def on_decode(module, inputs, output):
                counts["vae_out"] += output.shape[-1] * output.shape[-2]

            handles = [
                models.base.unet.register_forward_hook(on_unet, with_kwargs=True),
                models.refiner.unet.register_forward_hook(on_unet, with_kwargs=True),
                models.base.vae.encoder.register_forward_hook(on_encode),
                models.base.vae.decoder.register_forward_hook(on_decode),
            ]
            started = time.perf_counter()
            _, tiles = run(models, record, image, stage3)
            counts["seconds"] = time.perf_counter() - started
            counts["tiles"] = tiles
            for handle in handles:
                handle.remove()
            results[mode] = counts

        megapixels = width * height / 1e6
        print(f"stage 3 at {width}x{height} ({megapixels:.1f} MP), tile 2048/256, 18 steps x 0.4, refiner split 0.8")
        print(f"{'':24}{'pixel':>12}{'latent':>12}{'latent/pixel':>14}")
        for key, label in (("tiles", "tiles"), ("unet_calls", "UNet calls"), ("tile_evals", "tile evaluations"),
                           ("max_batch", "largest UNet batch"), ("vae_in", "VAE pixels encoded"),
                           ("vae_out", "VAE pixels decoded"), ("seconds", "seconds (tiny model)")):
            p, l = results["pixel"][key], results["latent"][key]
            fmt = (lambda v: f"{v:,.1f}") if key == "seconds" else (lambda v: f"{v:,}")
            print(f"{label:24}{fmt(p):>12}{fmt(l):>12}{(l / p if p else float('nan')):>14.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
