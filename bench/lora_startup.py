"""A daemon's start with a folder of full-size SDXL LoRAs: every file checked (read, hashed, every
layer's fit checked), against a restart that takes the verdicts remembered by the first start,
and a first start whose checks have a time budget (the daemon's: 10 s, then 1 s a pass; here
--budget-s, smaller than the whole check so that it shows).

SDXL is built on the meta device (shapes only); the LoRAs (rank 32, every layer real SDXL LoRAs
adapt, ~456 MB each) are copies of one file written to a temporary folder, so the files are in
the page cache: the first start's figure leaves out the disk, which only adds to it.

    python bench/lora_startup.py [--count 8] [--rank 32] [--budget-s 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=2.0)
    args = parser.parse_args()

    import torch
    from lora_read import sdxl_and_full_size_lora

    from sdxld.loras import LoraLibrary

    with tempfile.TemporaryDirectory(dir=Path.home()) as folder:
        folder = Path(folder)
        dirs = {kind: folder / kind for kind in ("character", "style")}
        base, first = sdxl_and_full_size_lora(dirs["character"] / "lora0.safetensors", args.rank)
        dirs["style"].mkdir()
        for index in range(1, args.count):
            shutil.copy(first, dirs["character" if index % 2 == 0 else "style"] / f"lora{index}.safetensors")

        def start(budget_s=None, remember_in=folder / "lora-checks") -> tuple[float, LoraLibrary]:
            library = LoraLibrary(base, dirs, {"character": 1.0, "style": 0.85}, remember_in=remember_in)
            started = time.perf_counter()
            library.sync(budget_s)
            return time.perf_counter() - started, library

        size_mb = first.stat().st_size / 1e6
        cold, _ = start()
        warm, restarted = start()
        loaded = [e.status for e in restarted.entries()].count("loaded")
        bounded, partial = start(args.budget_s, remember_in=folder / "other-checks")  # nothing remembered
        checked = {kind: len(partial.available(kind)) for kind in dirs}
    print(f"{args.count} SDXL-shaped LoRAs (rank {args.rank}, {size_mb:.0f} MB each), {torch.get_num_threads()} CPU threads")
    print(f"  first start: every file read, hashed and checked   {cold:.3f} s ({cold / args.count:.3f} s per LoRA)")
    print(f"  restart: the remembered verdicts ({loaded} loaded)      {warm:.3f} s ({warm / cold:.4f}x)")
    print(f"  first start, {args.budget_s:g} s budget: {checked['character']} character + {checked['style']} style checked, "
          f"the rest later   {bounded:.3f} s ({bounded / cold:.3f}x)")


if __name__ == "__main__":
    main()
