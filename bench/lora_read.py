"""Reading a full-size SDXL LoRA file as sdxld does when it is chosen: parse, name mapping, and
the check that every layer's difference fits its weight. No model weights: SDXL is built on the
meta device (shapes only), the LoRA (rank 32, every layer real SDXL LoRAs adapt) written to a
temporary file. Prints the layer checks asked per layer (as before) against once per combination
of factor shapes (as now), interleaved, medians of --rounds, and the ratio; then what preparing
the file for a merge costs when it is drawn (read from disk, parsed, stacked for the batched
merge), which a file kept in memory (lora.keep_in_memory_mb) skips.

    python bench/lora_read.py [--rounds 3] [--rank 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sdxl_and_full_size_lora(path: Path, rank: int):
    """SDXL's base pipeline built on the meta device (shapes only) and a LoRA of `rank` for every
    layer real SDXL LoRAs adapt, written to `path`: (pipeline, path)."""
    import torch
    from gpu import build_full

    from sdxld.models import quiet_libraries
    from sdxld.tiny import write_tiny_lora

    quiet_libraries()
    base, _ = build_full("meta", torch.float16, with_refiner=False)
    return base, write_tiny_lora(path, seed=1, rank=rank, scale=0.01, pipe=base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()

    import torch

    from sdxld import lora_formats
    from sdxld.lora_files import read_lora_weights

    folder = tempfile.TemporaryDirectory()
    base, path = sdxl_and_full_size_lora(Path(folder.name) / "full.safetensors", args.rank)
    data = path.read_bytes()
    cached = lora_formats._difference_shape
    ways = {"per layer": cached.__wrapped__, "per shape combination": cached}
    times: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.rounds):
            for name, check in ways.items():
                lora_formats._difference_shape = check
                cached.cache_clear()  # each read starts cold, as the first file of a run does
                started = time.perf_counter()
                weights = read_lora_weights(base, data)
                times[name].append(time.perf_counter() - started)
    finally:
        lora_formats._difference_shape = cached
    layers = sum(len(patches) for patches in weights.layers.values())
    print(f"SDXL-shaped LoRA, rank {args.rank}, {len(data) / 1e6:.0f} MB, {layers} layers, "
          f"{cached.cache_info().currsize} combinations of factor shapes; {torch.get_num_threads()} CPU threads")
    before, now = (statistics.median(times[name]) for name in ways)
    print(f"  read with layer checks per layer           {before:.3f} s")
    print(f"  read with checks per shape combination     {now:.3f} s   ({now / before:.2f}x)")

    # What a draw of a file not kept in memory costs the host before any arithmetic: the bytes
    # from disk (the page cache here: a second read), parsing, stacking (pageable memory here;
    # pinned on a GPU, where the first pinning of a buffer costs more).
    phases: dict[str, list[float]] = {"read from disk": [], "parsed against the model": [], "stacked": []}
    for _ in range(args.rounds):
        started = time.perf_counter()
        data = path.read_bytes()
        read = time.perf_counter()
        weights = read_lora_weights(base, data)
        parsed = time.perf_counter()
        weights.stacked()
        stacked = time.perf_counter()
        for name, seconds in zip(phases, (read - started, parsed - read, stacked - parsed)):
            phases[name].append(seconds)
    medians = {name: statistics.median(times) for name, times in phases.items()}
    print(f"  prepared for a merge when drawn: {sum(medians.values()):.3f} s ("
          + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in medians.items())
          + f"); kept in memory: none of it, {weights.held_bytes() / 1e6:.0f} MB held")
    folder.cleanup()


if __name__ == "__main__":
    main()
