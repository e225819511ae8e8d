"""SDXL's attention under each of PyTorch's SDPA backends (flash, memory-efficient, cuDNN), at
the shapes sdxld's stages give it: whether choosing a backend other than torch's default would
pay, before a switch for it is built.

    python bench/attention.py                              # CPU rehearsal: shapes at 1/4 scale
    python bench/attention.py --device cuda --dtype bf16   # SDXL's real shapes

The attention calls are not guessed: SDXL's base and refiner UNets and its VAE (published
architectures, random weights) run one forward each on PyTorch's meta device at each stage's
shape, and every scaled_dot_product_attention call is recorded (batch, heads, query and key
lengths, head size). Each distinct shape is then timed on --device under each backend (medians
of --repeats, outputs compared with the first backend that ran), and summed per UNet or VAE call
as that call makes them. A backend that refuses a shape (flash: head size over 256, as the VAE's
512) says so. torch's own choice is the `default` column.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def calls_per_forward(model, forward) -> Counter:
    """(batch, heads, query length, key length, head size) of each SDPA call `forward` makes."""
    import torch
    import torch.nn.functional as F

    shapes: Counter = Counter()
    real = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        shapes[(*query.shape[:3], key.shape[2], query.shape[3])] += 1
        return real(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            forward(model)
    finally:
        F.scaled_dot_product_attention = real
    return shapes


def unet_call(batch: int, latent: tuple[int, int], context: int, pooled: int, time_ids: int):
    import torch

    def forward(unet):
        unet(torch.empty(batch, 4, *latent, device="meta", dtype=unet.dtype), 500,
             encoder_hidden_states=torch.empty(batch, 77, context, device="meta", dtype=unet.dtype),
             added_cond_kwargs={"text_embeds": torch.empty(batch, pooled, device="meta", dtype=unet.dtype),
                                "time_ids": torch.empty(batch, time_ids, device="meta", dtype=unet.dtype)})
    return forward


def calls_to_time(scale: int) -> list[tuple[str, Counter]]:
    """Per call the stages make, the attention shapes it runs (sizes divided by `scale`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from gpu import FULL, REFINER_UNET, SDXL_UNET, SDXL_VAE
    from sdxld.models import quiet_libraries

    quiet_libraries()

    def latent(size):
        return (size[1] // 8 // scale, size[0] // 8 // scale)

    with torch.device("meta"):
        base = UNet2DConditionModel(**SDXL_UNET).to(torch.bfloat16)
        refiner = UNet2DConditionModel(**REFINER_UNET).to(torch.bfloat16)
        vae = AutoencoderKL(**SDXL_VAE).to(torch.bfloat16)
    tile = (FULL.tile, FULL.tile)
    vae_tile = latent((1024, 1024))  # the SDXL VAE's own tile (tile_sample_min_size)
    calls = []
    for label, batch, size in (("stage 1, one image (CFG: batch 2)", 2, FULL.base),
                               ("stage 1, a batch of 8", 16, FULL.base),
                               ("stage 2", 2, FULL.mid),
                               ("stage 3, a call of 2 tiles", 4, tile)):
        calls.append((f"base UNet, {label}", calls_per_forward(base, unet_call(batch, latent(size), 2048, 1280, 6))))
        if "batch of 8" not in label:
            calls.append((f"refiner UNet, {label}", calls_per_forward(refiner, unet_call(batch, latent(size), 1280, 1280, 5))))
    pixels = (vae_tile[0] * 8, vae_tile[1] * 8)
    calls.append(("VAE decode, one 1024 px tile", calls_per_forward(
        vae, lambda v: v.decode(torch.empty(1, 4, *vae_tile, device="meta", dtype=v.dtype)))))
    calls.append(("VAE encode, one 1024 px tile", calls_per_forward(
        vae, lambda v: v.encode(torch.empty(1, 3, *pixels, device="meta", dtype=v.dtype)))))
    return calls


def time_shape(shape, device: str, dtype, repeats: int) -> dict:
    """Seconds per call under each backend and torch's default (None where refused), and the
    largest difference from the first backend that ran."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, queries, keys, size = shape
    generator = torch.Generator(device).manual_seed(0)
    query = torch.randn(batch, heads, queries, size, device=device, dtype=dtype, generator=generator)
    key = torch.randn(batch, heads, keys, size, device=device, dtype=dtype, generator=generator)
    value = torch.randn(batch, heads, keys, size, device=device, dtype=dtype, generator=generator)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    results, reference = {}, None
    for name in (*BACKENDS, "default"):
        context = sdpa_kernel([getattr(SDPBackend, name)]) if name != "default" else torch.no_grad()
        try:
            # torch says why a backend refuses a shape in warnings, then raises a general error.
            with context, torch.no_grad(), warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                out = F.scaled_dot_product_attention(query, key, value)  # also the warm-up
                seconds = []
                for _ in range(repeats):
                    sync()
                    start = time.perf_counter()
                    F.scaled_dot_product_attention(query, key, value)
                    sync()
                    seconds.append(time.perf_counter() - start)
        except RuntimeError as err:
            reasons = [str(w.message).splitlines()[0] for w in said] or [str(err).splitlines()[0]]
            results[name] = (None, reasons[0][:120])
            continue
        if reference is None:
            reference, difference = out.float(), 0.0
        else:
            difference = (out.float() - reference).abs().max().item()
        results[name] = (statistics.median(seconds), difference)
    return results


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 10 on a GPU, 2 on the CPU")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide every image size by this (default: 1 on a GPU, 4 on the CPU, whose "
                             "seconds are not a GPU's anyway)")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if on_gpu else "fp32")]
    repeats = args.repeats or (10 if on_gpu else 2)
    scale = args.scale or (1 if on_gpu else 4)
    card = torch.cuda.get_device_name() if on_gpu else "CPU"
    priority = getattr(torch._C, "_get_sdp_priority_order", lambda: [])()
    order = [torch.nn.attention.SDPBackend(value).name for value in priority] if priority else "unknown"
    print(f"SDPA backends on {card}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')}, sizes / {scale}, "
          f"medians of {repeats}; torch's order of preference: {order}", flush=True)

    timed: dict = {}
    columns = (*BACKENDS, "default")
    print("\n| call | SDPA calls | " + " | ".join(f"{name.split('_')[0].lower()} ms" for name in columns)
          + " | cudnn / flash | largest difference from the first backend |")
    print("|---|---:|" + "---:|" * len(columns) + "---:|---:|")
    for label, shapes in calls_to_time(scale):
        totals = {name: 0.0 for name in columns}
        refused, largest = set(), 0.0
        for shape, count in shapes.items():
            if shape not in timed:
                timed[shape] = time_shape(shape, args.device, dtype, repeats)
            for name in columns:
                seconds, detail = timed[shape][name]
                if seconds is None:
                    refused.add(name)
                else:
                    totals[name] += seconds * count
                    largest = max(largest, detail)
        cells = ["refused" if name in refused else f"{totals[name] * 1000:.2f}" for name in columns]
        ratio = ("" if {"CUDNN_ATTENTION", "FLASH_ATTENTION"} & refused
                 else f"{totals['CUDNN_ATTENTION'] / totals['FLASH_ATTENTION']:.2f}x")
        print(f"| {label} | {sum(shapes.values())} | " + " | ".join(cells) + f" | {ratio} | {largest:.1e} |", flush=True)
    refusals = Counter((name, detail) for results in timed.values()
                       for name, (seconds, detail) in results.items() if seconds is None)
    if refusals:
        print("\nRefusals ('refused' above: the backend refused a shape the call runs):")
        for (name, reason), count in sorted(refusals.items()):
            print(f"  {name}, {count} of {len(timed)} shapes: {reason}")

if __name__ == "__main__":
    main()
