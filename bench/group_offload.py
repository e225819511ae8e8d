"""memory.strategy group_offload: which block grouping is fastest for SDXL, with peak VRAM.

Builds full-size random SDXL base for each variant (fresh pipeline, then group offload), runs
stage 1 at 768x1344 for --steps steps after a 2-step warm-up, and prints seconds and peak VRAM,
with model_offload as the reference in the same run.

    python bench/group_offload.py [--steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time


VARIANTS = {
    "model_offload": None,
    "block_level, 1 block/group, streams": dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True),
    "block_level, 4 blocks/group, streams": dict(offload_type="block_level", num_blocks_per_group=4, use_stream=True),
    "leaf_level, streams": dict(offload_type="leaf_level", use_stream=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import torch
    from gpu import FULL, build_full, make_bank, make_record

    from sdxld.models import quiet_libraries
    from sdxld.stages import NaNImageError, stage1

    quiet_libraries()
    record = dataclasses.replace(make_record(FULL, False), steps=args.steps)
    print(f"{torch.cuda.get_device_name(0)}, stage 1 768x1344, {args.steps} steps", flush=True)
    for name, options in VARIANTS.items():
        base, _ = build_full("cuda", torch.bfloat16, with_refiner=False)
        base.to("cpu")
        if options is None:
            base.enable_model_cpu_offload()
        else:
            base.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"), **options)
        models = make_bank(base, None, "cuda", "bf16")

        def run(steps):
            try:
                stage1(models, dataclasses.replace(record, steps=steps))
            except NaNImageError:
                pass

        run(2)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        run(args.steps)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(f"{name:40s} {seconds:6.2f} s  peak {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB", flush=True)
        del base, models
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
