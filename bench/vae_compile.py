"""The SDXL VAE eager against compiled (performance.compile_vae), and eager in the channels-last
memory layout (performance.channels_last): one decode and one encode each, alternated, on SDXL's
real VAE architecture with random weights.

    python bench/vae_compile.py                     # CPU, 256x256 px, fp32, inductor
    python bench/vae_compile.py --device cuda --size 768x1344 --dtype bf16

What inductor changes is the work around the convolutions (group norms, SiLU, the residual adds,
upcasts), fused into fewer passes over memory; the convolutions themselves stay the library's
(oneDNN on the CPU, cuDNN on a GPU). Channels-last changes the convolutions' own memory layout:
cuDNN's tensor-core kernels read channels last, and a tensor in the default layout may be
transposed on the way in and out of each. channels_last was measured on stage 1 only (no gain on
the H200), where the UNet's host work set the pace; the VAE at stage 2's and stage 3's sizes is
convolutions on large images (a tile of 1024 px: --size 1024x1024). On the CPU the seconds are not
a GPU's; the ratio says how much of the VAE's time that work was there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from diffusers import AutoencoderKL

    from gpu import SDXL_VAE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="256x256", help="WIDTHxHEIGHT in pixels (multiples of 8)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("x"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    eager = AutoencoderKL(**SDXL_VAE).to(args.device, dtype).eval()
    compiled = AutoencoderKL(**SDXL_VAE).to(args.device, dtype).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.encoder.compile()
    compiled.decoder.compile()
    channels_last = AutoencoderKL(**SDXL_VAE).to(args.device, dtype).eval()
    channels_last.load_state_dict(eager.state_dict())
    channels_last.to(memory_format=torch.channels_last)
    latent = torch.randn(1, 4, height // 8, width // 8, device=args.device, dtype=dtype)
    pixels = torch.rand(1, 3, height, width, device=args.device, dtype=dtype) * 2 - 1

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(work) -> float:
        sync()
        started = time.perf_counter()
        work()
        sync()
        return time.perf_counter() - started

    jobs = {
        "decode": lambda vae: vae.decode(latent).sample,
        "encode": lambda vae: vae.encode(pixels).latent_dist.mean,
    }
    print(f"SDXL VAE, random weights, {width}x{height} px, {args.dtype}, {args.device}; medians of "
          f"{args.repeats}, eager, channels-last and compiled alternated", flush=True)

    def relative_difference(a, b) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    variants = (("eager", eager), ("channels-last", channels_last), ("compiled", compiled))
    with torch.inference_mode():
        for name, job in jobs.items():
            build = timed(lambda: job(compiled))
            job(eager), job(channels_last)  # warm-up
            reference = job(eager)
            errors = {which: relative_difference(job(vae), reference) for which, vae in variants[1:]}
            times = {which: [] for which, _ in variants}
            for _ in range(args.repeats):
                for which, vae in variants:
                    times[which].append(timed(lambda: job(vae)))
            eager_s = statistics.median(times["eager"])
            others = ", ".join(f"{which} {statistics.median(times[which]):.3f} s = "
                               f"{statistics.median(times[which]) / eager_s:.2f}x (outputs differ by {errors[which]:.1e})"
                               for which, _ in variants[1:])
            print(f"{name}: eager {eager_s:.3f} s, {others}; the compiled build (first call): {build:.1f} s", flush=True)


if __name__ == "__main__":
    main()
