"""How many operations the host dispatches for one call of SDXL's UNet, counted on the CPU.

At batch 1 on the H100 machine stage 1's UNet kept the card busy 1.3 s of 3.2 s (30 steps): the
host, issuing each operation through diffusers' modules and torch's dispatcher, set the pace.
This counts those operations for one CFG call at stage 1's size, with the full-size UNet built on
PyTorch's meta device (shapes, no data, no weights in memory), by operation, with and without
performance.fuse_qkv. Dividing a step's seconds on a card by the count gives the host's cost per
operation there; the cure for the count is compiling (fused kernels) or CUDA graphs (no
launches), which the GPU bench's graphs section times.

    python bench/unet_ops.py [--width 768 --height 1344 --top 15]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def count_ops(fuse_qkv: bool, width: int, height: int) -> Counter:
    import torch
    from diffusers import UNet2DConditionModel

    from sdxld.host_waits import CountOperations
    from sdxld.quantize import fixed_unet_inputs

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu import SDXL_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16).eval()
    if fuse_qkv:
        unet.fuse_qkv_projections()
    args, kwargs = fixed_unet_inputs(unet, batch=2, latent_hw=(height // 8, width // 8))  # the CFG pair, on meta
    with torch.inference_mode(), CountOperations() as counter:
        unet(*args, **kwargs)
    return counter.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--height", type=int, default=1344)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    from sdxld.models import quiet_libraries

    quiet_libraries()
    plain, fused = count_ops(False, args.width, args.height), count_ops(True, args.width, args.height)
    print(f"SDXL UNet, one CFG call at {args.width}x{args.height}: operations dispatched by the host")
    print(f"{'operation':34} {'plain':>7} {'fuse_qkv':>9}")
    for name, count in plain.most_common(args.top):
        print(f"  {name:32} {count:7d} {fused[name]:9d}")
    print(f"  {'all':32} {sum(plain.values()):7d} {sum(fused.values()):9d}  ({sum(fused.values()) / sum(plain.values()):.2f}x)")


if __name__ == "__main__":
    main()
