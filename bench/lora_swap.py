"""LoRA swapping cost and the price of merged LoRAs per image, measured in one run.

Builds SDXL (full size with random weights on CUDA, or the tiny model with --tiny), writes three
random rank-32 LoRAs covering every layer real SDXL LoRAs adapt, then reports:
- the time of one swap (read the file, rebuild the touched layers from their saved originals),
  with the top functions of a cProfile of it, and the torch calls the host made for it (each a
  kernel launch, a copy or a view on a GPU; on the CPU the copies of the LoRA and the originals
  to the device are no-ops, so a GPU dispatches more than counted here),
- the host memory the saved originals hold (page-locked where CUDA is),
- stage 1 with two LoRAs merged vs without, interleaved, as a ratio (goal: 1.00, merged weights
  cost nothing per step),
for memory.strategy gpu and model_offload.

    python bench/lora_swap.py            # CUDA
    python bench/lora_swap.py --tiny     # CPU, tiny model
    python bench/lora_swap.py --cpu-full # CPU, full-size SDXL in bf16 (~8 GB of RAM): the swap's
                                         # torch calls at SDXL's real layer count; no images
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import io
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--cpu-full", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch
    from gpu import FULL, TINY, build_full, default_kept_lora_bytes, make_bank, make_record

    from sdxld.host_copies import pinned_bytes
    from sdxld.host_waits import CountOperations
    from sdxld.loras import LoraLibrary
    from sdxld.models import quiet_libraries
    from sdxld.stages import NaNImageError, stage1
    from sdxld.tiny import build_pipelines, write_tiny_lora

    quiet_libraries()
    if args.tiny:
        device, geometry, rank = "cpu", TINY, 4
        base, _ = build_pipelines()
    elif args.cpu_full:
        device, geometry, rank = "cpu", FULL, 32
        base, _ = build_full("cpu", torch.bfloat16, with_refiner=False)
    else:
        device, geometry, rank = "cuda", FULL, 32
        base, _ = build_full("cuda", torch.bfloat16, with_refiner=False)
    base.to(device)
    models = make_bank(base, None, device, "fp32" if args.tiny else "bf16")
    record = make_record(geometry, False)
    # Three full-size LoRAs: 1.4 GB, removed at exit.
    folder = Path(tempfile.mkdtemp(prefix="sdxld-lora-swap-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    dirs = {"character": folder / "character", "style": folder / "style"}
    for name, fmt, seed in (("character/c1", "kohya", 1), ("character/c2", "diffusers", 2), ("style/s1", "kohya", 3)):
        write_tiny_lora(folder / f"{name}.safetensors", fmt, seed=seed, rank=rank, scale=0.01, pipe=base)
    library = LoraLibrary(base, dirs, {"character": 1.0, "style": 0.85}, keep_in_memory_bytes=default_kept_lora_bytes())
    library.sync()
    c1, c2 = library.available("character")
    (s1,) = library.available("style")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - started

    def image():
        try:
            stage1(models, record)
        except NaNImageError:
            pass  # random weights; all the work was done

    for strategy in ("gpu", "model_offload") if device == "cuda" else ("gpu",):
        if strategy == "model_offload":
            base.to("cpu")
            base.enable_model_cpu_offload()
        first = timed(lambda: library.activate([c1, s1]))
        with CountOperations() as calls:
            library.activate([c2, s1])  # c2's first draw: read from disk
        with CountOperations() as kept_calls:
            library.activate([c1, s1])  # c1 drawn again: kept in memory
        originals = library.merger.saved_originals()
        for what, counted in (("read from disk", calls), ("kept in memory", kept_calls)):
            print(f"== {len(originals)} layers adapted; {counted.total:,} operations dispatched for a swap of the "
                  f"character LoRA {what} ({counted.total / len(originals):.1f} per layer), {counted.beyond_views:,} "
                  f"of them more than a view; most: "
                  + ", ".join(f"{name} {n}" for name, n in counted.counts.most_common(8)))
        print(f"originals kept: {sum(t.numel() * t.element_size() for t in originals) / 2**30:.2f} GiB of weights "
              f"in {pinned_bytes(originals) / 2**30:.2f} GiB of {'page-locked ' if device == 'cuda' else ''}host memory")
        if args.cpu_full:
            swaps = [timed(lambda pair=pair: library.activate(pair)) for pair in ([c2, s1], [c1, s1], [c2, s1])]
            print(f"first merge {first:.2f} s; swaps {', '.join(f'{s:.2f}' for s in swaps)} s (CPU arithmetic)")
            continue
        profile = cProfile.Profile()
        sync()
        profile.enable()
        swap = timed(lambda: library.activate([c2, s1]))
        profile.disable()
        swaps = [timed(lambda pair=pair: library.activate(pair)) for pair in ([c1, s1], [c2, s1], [c1, s1])]
        image()  # warm-up
        plain, merged = [], []
        for _ in range(args.rounds):
            library.activate([])
            plain.append(timed(image))
            library.activate([c1, s1])
            merged.append(timed(image))
        print(f"== memory.strategy {strategy} on {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
        print(f"first merge (saves originals) {first:.2f} s; swap of the character LoRA {swap:.2f} s, "
              f"then {', '.join(f'{s:.2f}' for s in swaps)} s")
        print(f"stage 1 plain {statistics.median(plain):.3f} s, with 2 LoRAs merged {statistics.median(merged):.3f} s: "
              f"ratio {statistics.median(merged) / statistics.median(plain):.3f} (medians of {args.rounds}, interleaved)")
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-2000:])


if __name__ == "__main__":
    main()
