"""Where the models live: the memory strategies, applied to all pipelines at once.

The base, its img2img view (`from_pipe`: the very same modules) and the refiner (which shares the
base's VAE and second text encoder) are one set of modules used by three pipelines and by
sdxld's own latent tiling loop. diffusers' offload methods work per pipeline: each chains hooks
over its own components and frees them at the end of its own `__call__`. Applied per pipeline,
model_offload broke its promise: img2img has no hooks of its own, so nothing sent the base UNet
back after stage 2; the refiner's chain never evicts the base UNet, so both UNets sat on the GPU
(about 10 GB in fp16 instead of 5); and the refiner re-hooked the modules it shares.

So model_offload here hooks every distinct module once, with one rule: a module that is about to
run on the GPU first sends the module that was there back to the CPU, whichever pipeline (or
loop) calls it. Group and sequential offload work per layer and only need each module hooked once.
"""

from __future__ import annotations

import logging

from accelerate.hooks import CpuOffload, UserCpuOffloadHook, add_hook_to_module

from . import diffusers_private

log = logging.getLogger(__name__)


def distinct_modules(pipes: list) -> list:
    """Every torch module the pipelines hold, each once (shared modules appear in several)."""
    import torch

    seen: dict[int, object] = {}
    for pipe in pipes:
        if pipe is None:
            continue
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                seen.setdefault(id(module), module)
    return list(seen.values())


class OneModelOnDevice:
    """model_offload across pipelines: at most one model (UNet, refiner UNet, a text encoder, the
    VAE) on the execution device at any time.

    Each module carries an accelerate CpuOffload hook, the same hook diffusers' own model offload
    uses, so pipelines find their execution device as usual. Instead of a fixed chain (each hook
    evicting the one model before it in one pipeline's order), the hook asks this object to make
    its module the resident one, which evicts whatever is resident now.
    """

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Parameters report cuda:N; comparing against a bare "cuda" would move them every call.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._hooks: list = []  # accelerate UserCpuOffloadHook per module
        self.resident = None

    def add(self, module) -> None:
        if any(hook.model is module for hook in self._hooks):
            return
        hook = _ExclusiveCpuOffload(self, execution_device=self.device)
        add_hook_to_module(module, hook, append=True)  # its init_hook moves the module to the CPU
        self._hooks.append(UserCpuOffloadHook(module, hook))

    def make_resident(self, module) -> None:
        if self.resident is module:
            return
        self.evict()
        self.resident = module

    def evict(self) -> None:
        """Send the resident module (if any) back to the CPU and free its cached VRAM."""
        import torch

        for hook in self._hooks:
            if hook.model is self.resident:
                hook.offload()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.resident = None

    def modules(self) -> list:
        return [hook.model for hook in self._hooks]


class _ExclusiveCpuOffload(CpuOffload):
    """accelerate's model-offload hook, with the coordinator deciding what leaves the device."""

    def __init__(self, group: OneModelOnDevice, execution_device):
        super().__init__(execution_device=execution_device)
        self.group = group

    def pre_forward(self, module, *args, **kwargs):
        self.group.make_resident(module)
        return super().pre_forward(module, *args, **kwargs)


def place(strategy: str, device: str, base, refiner) -> OneModelOnDevice | None:
    """Put the base (and refiner) on `device` under `strategy`; returns the model-offload
    coordinator when there is one (it can evict the resident model before non-pipeline work)."""
    pipes = [p for p in (base, refiner) if p is not None]
    if strategy == "gpu":
        for pipe in pipes:
            pipe.to(device)
        return None
    if strategy == "model_offload":
        group = OneModelOnDevice(device)
        for module in distinct_modules(pipes):
            group.add(module)
        return group
    if strategy == "group_offload":
        _group_offload(base, device, whole_pipeline=True)
        if refiner is not None:
            _group_offload(refiner, device, whole_pipeline=False)
        return None
    if strategy == "sequential_offload":
        base.enable_sequential_cpu_offload(device=device)
        if refiner is not None:
            # Only the refiner's own UNet: its VAE and text encoder are the base's, already
            # hooked (offloading them twice would hook weights that already live on 'meta').
            from accelerate import cpu_offload

            cpu_offload(refiner.unet, device, offload_buffers=diffusers_private.has_own_parameters(refiner.unet))
            diffusers_private.share_offload_device(refiner, base)
        return None
    raise ValueError(f"unknown memory strategy {strategy!r}")


def _group_offload(pipe, device: str, whole_pipeline: bool) -> None:
    """Leaf-level offload: each layer moves to the GPU just ahead of use (with CUDA streams).

    The pipeline-level call also covers the transformers text encoders (they have no method of
    their own). The refiner shares the base's VAE and text encoder 2, which already carry hooks:
    only its own UNet is offloaded there.
    """
    import torch

    # leaf_level with streams measured best on an H200 (bench/results/NVIDIA-H200-group-offload.md):
    # 3.70 s for 10 steps at 1.8 GiB peak, vs 4.67-5.01 s at 4.7 GiB for block_level groupings
    # and 6.48 s at 5.1 GiB for model_offload in the same run.
    on = torch.device(device)
    options = dict(onload_device=on, offload_device=torch.device("cpu"), offload_type="leaf_level",
                   use_stream=on.type == "cuda")
    if whole_pipeline:
        pipe.enable_group_offload(**options)
    else:
        pipe.unet.enable_group_offload(**options)
