"""How often each sampler's step makes the host wait for the GPU, counted on the CPU.

A copy from host memory to the GPU (`tensor.to("cuda")` of a CPU tensor, blocking) and a read of
a GPU value on the host (`.item()`, the error check of `torch.linalg.solve`) each wait until the
GPU has finished everything queued. Once per step, that empties the queue the host had built
ahead: the next step's first kernels start only as the host issues them. This counts those
operations in diffusers' scheduler steps with the latents on PyTorch's meta device (shapes, no
data), so a host->device copy shows as a copy from the CPU to meta: exact counts, no GPU needed.
What they cost in seconds is the GPU bench's (`bench/gpu.py`, fast section: stage 1 profiled, and
stage 1 with a sampler whose steps never wait).

    python bench/scheduler_waits.py [--steps 30]
"""

from __future__ import annotations

import argparse
import inspect
from collections import Counter

def waits_per_step(sampler: str, steps: int) -> Counter:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from sdxld.models import make_scheduler
    from sdxld.tiny import sdxl_scheduler

    class CountWaits(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            op = str(func.overloadpacket)
            if op == "aten._to_copy" and args[0].device.type == "cpu" and str(kwargs.get("device", "cpu")) == "meta":
                self.counts["host->device copies"] += 1
            elif op == "aten.copy_" and args[1].device.type == "cpu" and args[0].device.type == "meta":
                self.counts["host->device copies"] += 1
            elif op == "aten._local_scalar_dense" and args[0].device.type != "cpu":
                self.counts["device values read"] += 1
            elif op.startswith("aten._linalg_solve"):  # torch.linalg.solve reads its error flag back
                self.counts["linalg.solve"] += 1
            return func(*args, **kwargs)

    scheduler = make_scheduler(sampler, sdxl_scheduler().config)  # SDXL's own noise schedule
    # Where the pipeline keeps them: the schedule on the host, the timesteps with the latents.
    scheduler.set_timesteps(steps, device="cpu")
    scheduler.timesteps = scheduler.timesteps.to("meta")
    # The pipeline's first step looks its index up (one nonzero(), one wait per image): set here,
    # since meta tensors have no values to look up.
    scheduler.set_begin_index(0)
    latents = torch.empty(1, 4, 168, 96, device="meta", dtype=torch.bfloat16)
    # sdxld's generators are on the CPU (the same noise on any device): ancestral samplers draw
    # their step's noise there and copy it over.
    generator = torch.Generator("cpu").manual_seed(0)
    # As the pipelines pass it: only to a step that takes one.
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    counter = CountWaits()
    with counter:
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(torch.empty_like(model_input), t, latents, return_dict=False, **extra)[0]
    return Counter({what: count / steps for what, count in counter.counts.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from sdxld.config import SAMPLERS
    from sdxld.models import quiet_libraries

    quiet_libraries()
    print(f"host waits per step, {args.steps} steps (plus one per image: the first step's index lookup)")
    for sampler in SAMPLERS:
        counts = waits_per_step(sampler, args.steps)
        total = sum(counts.values())
        detail = ", ".join(f"{what} {count:.1f}" for what, count in sorted(counts.items())) or "none"
        print(f"  {sampler:16} {total:4.1f}  ({detail})")


if __name__ == "__main__":
    main()
