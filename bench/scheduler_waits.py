"""How often each sampler's step makes the host wait for the GPU, counted on the CPU.

A copy from host memory to the GPU (`tensor.to("cuda")` of a CPU tensor, blocking) and a read of
a GPU value on the host (`.item()`, the error check of `torch.linalg.solve`) each wait until the
GPU has finished everything queued. Once per step, that empties the queue the host had built
ahead: the next step's first kernels start only as the host issues them. This counts those
operations in each sampler's scheduler steps (and in diffusers' own UniPC and Euler a, which
sdxld's replace) with the latents on PyTorch's meta device (shapes, no data), so a host->device
copy shows as a copy from the CPU to meta: exact counts, no GPU needed (the counter:
sdxld/host_waits.py). What they cost in seconds is the GPU bench's (`bench/gpu.py`, fast section:
stage 1 profiled, and stage 1 with sdxld's UniPC against diffusers').

    python bench/scheduler_waits.py [--steps 30]
"""

from __future__ import annotations

import argparse

# What sdxld's UniPC and Euler a (sdxld/samplers.py) replace, for comparison.
DIFFUSERS_OWN = {"UniPC, diffusers'": "UniPCMultistepScheduler", "Euler a, diffusers'": "EulerAncestralDiscreteScheduler"}


def scheduler_for(sampler: str):
    from sdxld.models import make_scheduler
    from sdxld.tiny import sdxl_scheduler

    if sampler in DIFFUSERS_OWN:
        import diffusers

        return getattr(diffusers, DIFFUSERS_OWN[sampler]).from_config(sdxl_scheduler().config)
    return make_scheduler(sampler, sdxl_scheduler().config)  # SDXL's own noise schedule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from sdxld.config import SAMPLERS
    from sdxld.host_waits import waits_per_step
    from sdxld.models import quiet_libraries

    quiet_libraries()
    print(f"host waits per step, {args.steps} steps (the begin index set, as SDXL's pipelines set it)")
    for sampler in [*SAMPLERS, *DIFFUSERS_OWN]:
        counts = waits_per_step(scheduler_for(sampler), args.steps)
        total = sum(counts.values())
        detail = ", ".join(f"{what} {count:.1f}" for what, count in sorted(counts.items())) or "none"
        print(f"  {sampler:19} {total:4.1f}  ({detail})")


if __name__ == "__main__":
    main()
