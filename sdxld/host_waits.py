"""Count what makes the host wait for the GPU in a sampler's steps, on a machine without one, and
how many operations the host dispatches for a piece of work (each a kernel launch, a copy or a
view on a GPU; at batch 1 the host's dispatching sets stage 1's pace on the H100 machine).

A blocking copy from host memory to the GPU, a GPU value read on the host (`.item()`) and
`torch.linalg.solve` on the GPU (it reads its error flag back) each wait until the GPU has run
everything queued. Run with the latents on PyTorch's meta device (shapes, no data), a copy to the
GPU shows up as a copy from the CPU to meta: exact counts, no GPU. Used by
bench/scheduler_waits.py (every sampler), tests/test_samplers.py (sdxld's samplers never wait) and
tests/test_conditioning.py (nor does encoding a batch's prompts); CountOperations by
bench/unet_ops.py, bench/lora_swap.py, bench/text_encoders.py and tests/test_lora_stacks.py.
`queued_copy` is how sdxld copies to the card without waiting.
"""

from __future__ import annotations

import inspect
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountHostWaits(TorchDispatchMode):
    """Counts, by kind, the operations that would make the host wait, meta standing in for the GPU."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = str(func.overloadpacket)
        given = _by_name(func, args, kwargs)
        # A non-blocking copy is queued, not waited for (on a GPU, from pinned memory: sdxld pins),
        # unless it also converts: PyTorch converts on the CPU into a new, pageable tensor, and
        # CUDA waits for the stream before a copy from pageable memory. Inference tensors reach
        # the dispatcher as aten.to, others as aten._to_copy.
        if op in ("aten._to_copy", "aten.to") and _on(given.get("self"), "cpu") and str(given.get("device")) == "meta" \
                and not (given.get("non_blocking") and given.get("dtype") in (None, given["self"].dtype)):
            self.counts["host->device copies"] += 1
        elif op == "aten.copy_" and _on(given.get("src"), "cpu") and _on(given.get("self"), "meta") \
                and not (given.get("non_blocking") and given["src"].dtype == given["self"].dtype):
            self.counts["host->device copies"] += 1
        elif op == "aten._local_scalar_dense" and not _on(args[0], "cpu"):
            self.counts["device values read"] += 1
        elif op.startswith("aten._linalg_solve") and not _on(args[0], "cpu"):
            self.counts["linalg.solve"] += 1
        return func(*args, **kwargs)


def queued_copy(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` (on the CPU) on `device` without making the host wait: from pageable memory a copy
    to a GPU blocks until the card has run everything queued; from pinned memory it is queued like
    a kernel (torch keeps the pinned block until the copy has run)."""
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _by_name(func, args, kwargs) -> dict:
    given = dict(zip((argument.name for argument in func._schema.arguments), args))
    given.update(kwargs)
    return given


def _on(tensor, device_type: str) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type == device_type


# Operations that only make a view of a tensor: no kernel, no copy.
VIEW_OPS = frozenset({"aten.view", "aten.select", "aten.unbind", "aten.slice", "aten.split", "aten.split_with_sizes",
                      "aten.as_strided", "aten.expand", "aten._unsafe_view", "aten.unsqueeze", "aten.squeeze", "aten.t",
                      "aten.transpose", "aten.permute", "aten.alias", "aten.detach", "aten._reshape_alias"})


class CountOperations(TorchDispatchMode):
    """Counts the operations the dispatcher runs, by name ("aten.bmm")."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def beyond_views(self) -> int:
        """The operations that do more than make a view."""
        return sum(n for name, n in self.counts.items() if name not in VIEW_OPS)


def waits_per_step(scheduler, steps: int = 30, latent_shape=(1, 4, 168, 96)) -> Counter:
    """The average count per step of each kind of wait over a `steps`-step run of `scheduler`."""
    # Where the pipeline keeps them: the schedule on the host, the timesteps with the latents.
    scheduler.set_timesteps(steps, device="cpu")
    scheduler.timesteps = scheduler.timesteps.to("meta")
    # As SDXL's pipelines do (txt2img 0, img2img its start); unset, the first step would look it
    # up with nonzero(), which meta tensors cannot answer.
    scheduler.set_begin_index(0)
    latents = torch.empty(*latent_shape, device="meta", dtype=torch.bfloat16)
    # sdxld's generators are on the CPU (the same noise on any device): ancestral samplers draw
    # their step's noise there and copy it over. As the pipelines pass it: only to a step that takes one.
    generator = torch.Generator("cpu").manual_seed(0)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    counter = CountHostWaits()
    with counter:
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(torch.empty_like(model_input), t, latents, return_dict=False, **extra)[0]
    return Counter({what: count / steps for what, count in counter.counts.items()})
