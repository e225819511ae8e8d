"""The stages: (models, record, settings) -> image. No file I/O here.

Each stage reads what it needs from the Record so that an image is always re-made (or upscaled)
with the prompt, seed and LoRAs that made it, whatever the prompt files say today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .records import Record


class Interrupted(Exception):
    """The run was asked to stop between two denoising steps; the partial image is discarded."""


class NaNImageError(RuntimeError):
    """The pipeline produced NaNs (typically the fp16 SDXL VAE overflowing)."""


@dataclass
class Hooks:
    """How a stage reports progress and learns that it should stop, without knowing who asks."""

    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[str, int, int], None] = lambda phase, step, total: None


def _step_callback(hooks: Hooks, phase: str):
    def callback(pipe, step, timestep, kwargs):
        # num_timesteps is what the pipeline really runs after a denoising_start/end cut.
        hooks.on_step(phase, step + 1, pipe.num_timesteps)
        if hooks.should_stop():
            pipe._interrupt = True
        return kwargs

    return callback


def _generator(device, seed: int):
    import torch

    # CPU generators give the same noise on every machine, so a seed reproduces across GPUs too.
    return torch.Generator("cpu").manual_seed(seed)


def to_pil(array: np.ndarray, what: str):
    """Float images in [0, 1] -> PIL, refusing NaN images instead of saving them black."""
    from PIL import Image

    if not np.isfinite(array).all():
        raise NaNImageError(
            f"{what} produced NaN pixels (usually the fp16 SDXL VAE overflowing); set performance.dtype "
            "to bf16 or fp32, or model.vae to madebyollin/sdxl-vae-fp16-fix"
        )
    image = (np.clip(array[0], 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(image)


def stage1(models, record: Record, hooks: Hooks | None = None):
    """Text to image at the base size, with the refiner taking over at `refiner_split` if recorded."""
    hooks = hooks or Hooks()
    models.set_sampler(record.sampler)
    use_refiner = models.refiner is not None and record.refiner_split is not None
    common = dict(
        prompt=record.prompt,
        negative_prompt=record.negative,
        num_inference_steps=record.steps,
        guidance_scale=record.cfg,
    )
    generator = _generator(models.device, record.seed)
    result = models.base(
        **common,
        width=record.width,
        height=record.height,
        generator=generator,
        denoising_end=record.refiner_split if use_refiner else None,
        output_type="latent" if use_refiner else "np",
        callback_on_step_end=_step_callback(hooks, "stage1"),
    )
    if hooks.should_stop():
        raise Interrupted("stage 1 interrupted")
    if use_refiner:
        result = models.refiner(
            **common,
            image=result.images,
            generator=generator,
            denoising_start=record.refiner_split,
            output_type="np",
            callback_on_step_end=_step_callback(hooks, "stage1 refiner"),
        )
        if hooks.should_stop():
            raise Interrupted("stage 1 interrupted")
    return to_pil(result.images, "stage 1")
