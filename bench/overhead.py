"""What sdxld adds on top of diffusers: its engine vs bare pipeline calls doing the same denoising.

Both sides run the tiny demo model on the CPU with identical prompts, seeds, sizes, steps and
refiner handoff, interleaved image by image so that machine noise hits both alike. sdxld's side
also picks LoRAs and prompt parts, writes the record and the PNG (atomically), which is the
overhead being measured; the bare side only denoises and decodes.

    python bench/overhead.py [--images 20]

Prints time ratios (sdxld / bare): stage 1, and stages 2+3 (pixel mode, the one with a bare
diffusers equivalent: one img2img call per tile).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--block", type=int, default=5, help="images per timed block (sdxld and bare alternate)")
    parser.add_argument("--sync-writes", action="store_true", help="save on the loop thread, as one-shot commands do")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from sdxld.config import from_dict
    from sdxld.engine import Engine, scaled
    from sdxld.stages import STAGE2_SEED_OFFSET, STAGE3_SEED_OFFSET, TILE_SEED_STRIDE
    from sdxld.tiling import blend, tile_grid
    from sdxld.tiny import apply_demo

    from sdxld.init import init_root

    root = init_root(Path(tempfile.mkdtemp(prefix="sdxld-overhead-"))).root
    try:
        config = apply_demo(from_dict({}, root))
        config.generation.stage3.mode = "pixel"
        engine = Engine.load(config, background_writes=not args.sync_writes)
        models, gen = engine.models, config.generation
        engine.stage1_once(seed=0)  # warm-up both paths
        split = gen.t2i.denoise_split

        def bare_stage1(record):
            latents = models.base(prompt=record.prompt, negative_prompt=record.negative, width=record.width,
                                  height=record.height, num_inference_steps=record.steps, guidance_scale=record.cfg,
                                  generator=torch.Generator().manual_seed(record.seed), denoising_end=split,
                                  output_type="latent").images
            return models.refiner(prompt=record.prompt, negative_prompt=record.negative, image=latents,
                                  num_inference_steps=record.steps, guidance_scale=record.cfg,
                                  generator=torch.Generator().manual_seed(record.seed), denoising_start=split).images[0]

        def bare_img2img(record, image, settings, seed, micro=None):
            return models.img2img(prompt=record.prompt, negative_prompt=record.negative, image=image,
                                  strength=settings.strength, num_inference_steps=settings.steps,
                                  guidance_scale=settings.cfg, generator=torch.Generator().manual_seed(seed),
                                  output_type="np", **(micro or {})).images[0]

        def bare_upscale(record, image):
            s2, s3 = gen.stage2, gen.stage3
            mid = image.resize(scaled(record.width, record.height, gen.mid_scale), Image.LANCZOS)
            refined = bare_img2img(record, mid, s2, record.seed + STAGE2_SEED_OFFSET)
            up = Image.fromarray((refined * 255).round().astype("uint8")).resize(
                scaled(record.width, record.height, gen.final_scale), Image.LANCZOS)
            tiles = tile_grid(up.width, up.height, s3.tile_size, s3.tile_overlap)
            done = []
            for i, t in enumerate(tiles):
                crop = up.crop((t.x, t.y, t.x + t.width, t.y + t.height))
                micro = dict(original_size=(up.height, up.width), crops_coords_top_left=(t.y, t.x), target_size=(t.height, t.width))
                done.append((t, bare_img2img(record, crop, s3, record.seed + STAGE3_SEED_OFFSET + i * TILE_SEED_STRIDE, micro)))
            return blend(done, up.width, up.height, s3.tile_overlap, s3.blend_mode)

        # Without the refiner on stages 2-3 so both sides run exactly one img2img per call.
        gen.stage2.use_refiner = gen.stage3.use_refiner = False
        times = {"sdxld stage 1": [], "bare stage 1": [], "sdxld stages 2+3": [], "bare stages 2+3": []}
        seeds = iter(range(1000, 1000 + args.images))
        records = []
        for block in range(max(1, args.images // args.block)):
            block_seeds = [next(seeds) for _ in range(args.block)]
            started = time.perf_counter()
            results = [engine.stage1_once(seed=seed) for seed in block_seeds]
            engine.flush()
            times["sdxld stage 1"].append((time.perf_counter() - started) / args.block)
            started = time.perf_counter()
            for result in results:
                bare_stage1(result.record)
            times["bare stage 1"].append((time.perf_counter() - started) / args.block)
            records.extend(results)
        for result in records[: max(3, args.images // 5)]:
            started = time.perf_counter()
            engine.upscale(result.record, result.image)
            times["sdxld stages 2+3"].append(time.perf_counter() - started)
            started = time.perf_counter()
            bare_upscale(result.record, result.image)
            times["bare stages 2+3"].append(time.perf_counter() - started)

        writes = "on the loop thread" if args.sync_writes else "on the writer thread"
        print(f"{args.images} images, tiny model, {torch.get_num_threads()} threads, stage-1 saves {writes}; median seconds per image")
        for key, values in times.items():
            print(f"  {key:18} {statistics.median(values):.4f}  (n={len(values)})")
        for stage in ("stage 1", "stages 2+3"):
            ratio = sum(times[f"sdxld {stage}"]) / sum(times[f"bare {stage}"])
            print(f"ratio sdxld/bare, {stage}: {ratio:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
