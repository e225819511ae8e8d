"""Every use of diffusers' (and accelerate's) private API, in one place.

sdxld needs a few things the libraries do not expose publicly. Each is wrapped here, so a
diffusers upgrade that changes one breaks this file and its test (tests/test_diffusers_private.py
has one per shim), not a stage or the LoRA merger. Written against diffusers 0.35-0.42.
"""

from __future__ import annotations

import functools

# SDXL's aesthetic-score micro-conditioning for img2img and the refiner: diffusers' defaults
# (`aesthetic_score`, `negative_aesthetic_score` of StableDiffusionXLImg2ImgPipeline.__call__),
# which the pipeline calls in stages 2 and 3 use too.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


def execution_device(pipe):
    """The device a pipeline computes on, offload hooks included (where its modules are moved to)."""
    return pipe._execution_device


def interrupt(pipe) -> None:
    """Make a running pipeline call stop after the current denoising step (from its step callback)."""
    pipe._interrupt = True


def img2img_time_ids(pipe, original_size, crop_top_left, target_size, dtype):
    """The (positive, negative) SDXL time ids an img2img or refiner pipeline conditions on: sizes and
    crop for the base, sizes, crop and aesthetic score for the refiner; on the host."""
    return type(pipe)._get_add_time_ids(
        pipe,
        original_size, crop_top_left, target_size, AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE,
        original_size, crop_top_left, target_size,
        dtype=dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )


def queue_pipeline_setup(pipe, device) -> None:
    """Let a pipeline call set itself up without waiting for the card to run what is queued.

    In the refiner's call (stage 1's and stage 2's hand-off from the base) diffusers' set-up waited
    for the base's steps to finish three times before queuing the refiner's first: the timesteps'
    copy to the GPU (sdxld's schedulers now queue it, samplers.py), `get_timesteps` reading back
    how many timesteps lie past `denoising_start` (`.item()`), and the SDXL time ids' copy to the
    GPU (a blocking copy from pageable memory). Here `get_timesteps` counts on the host copy of
    the timesteps sdxld's schedulers keep and answers with the same slice of the device's, and the
    time ids are made on the device with a queued copy. The same values either way; a scheduler
    of diffusers' own keeps diffusers' code. Set on the instance, for the methods the class has."""
    if callable(getattr(type(pipe), "get_timesteps", None)):
        pipe.get_timesteps = functools.partial(_get_timesteps_from_host, pipe)
    if callable(getattr(type(pipe), "_get_add_time_ids", None)):
        pipe._get_add_time_ids = functools.partial(_time_ids_queued, pipe, device)


def _get_timesteps_from_host(pipe, num_inference_steps, strength, device, denoising_start=None):
    from .samplers import timesteps_on_host

    scheduler, original = pipe.scheduler, type(pipe).get_timesteps
    on_host = timesteps_on_host(scheduler)
    if on_host is None:
        return original(pipe, num_inference_steps, strength, device, denoising_start)
    on_device = scheduler.timesteps
    scheduler.timesteps = on_host
    try:
        timesteps, steps = original(pipe, num_inference_steps, strength, device, denoising_start)
    finally:
        scheduler.timesteps = on_device
    # Both of diffusers' branches answer with a tail of the schedule.
    return on_device[len(on_device) - len(timesteps):], steps


def _time_ids_queued(pipe, device, *args, **kwargs):
    from .host_waits import queued_copy

    made = type(pipe)._get_add_time_ids(pipe, *args, **kwargs)
    if isinstance(made, tuple):
        return tuple(queued_copy(ids, device) for ids in made)
    return queued_copy(made, device)


def disable_offloading(pipe) -> tuple[bool, bool, bool]:
    """Remove the pipeline's offload hooks; returns which were on: (model, sequential, group)."""
    return pipe._optionally_disable_offloading(pipe)


def reapply_group_offloading(module) -> None:
    """Put a module's group-offload hooks back after its weights were rewritten (no-op without)."""
    from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

    _maybe_remove_and_reapply_group_offloading(module)


def offload_device(pipe, default: str = "cuda"):
    """The device enable_*_cpu_offload was given for this pipeline."""
    return getattr(pipe, "_offload_device", default)


def share_offload_device(target, source) -> None:
    """Record on `target` the offload device of `source` (a refiner whose UNet was hooked by hand)."""
    target._offload_device = source._offload_device


def has_own_parameters(module) -> bool:
    """Whether a module holds parameters itself (not only in submodules): accelerate's
    `offload_buffers` must then be set for its buffers to follow it."""
    return len(module._parameters) > 0


def vectorize_tile_blending(vae) -> None:
    """Blend a VAE's tile seams with one operation per seam instead of one per pixel row.

    AutoencoderKL's tiled encode and decode blend neighbouring tiles with `self.blend_v` and
    `self.blend_h`, which loop in Python over the overlap: 256 rows per seam at 1024-pixel tiles,
    ~11,500 iterations of four small kernels for a 3072x5376 final's decode (CPU time a GPU
    waits on). These do the same sums in one go, with each weight rounded as the loop's Python
    float is (to float32, then the products to the tensor's dtype): the same values, bit for bit.
    Set on the instance, so only sdxld's VAE is affected; a VAE class without the two methods
    (another architecture, a future diffusers) keeps its own code."""
    if callable(getattr(type(vae), "blend_v", None)) and callable(getattr(type(vae), "blend_h", None)):
        vae.blend_v = _blend_rows
        vae.blend_h = _blend_columns


def _seam_weights(extent: int, device, axis: int):
    """The loop's weights 1 - i/extent (for the tile before) and i/extent (for the tile after),
    computed in double as Python computes them, then float32 as a kernel takes a Python scalar."""
    import torch

    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    return ((1 - ramp).to(torch.float32).to(device).view(shape), ramp.to(torch.float32).to(device).view(shape))


def _blend_rows(a, b, blend_extent: int):
    return _blend_along(2, a, b, blend_extent)


def _blend_columns(a, b, blend_extent: int):
    return _blend_along(3, a, b, blend_extent)


def _blend_along(axis: int, a, b, blend_extent: int):
    """The start of `b` along `axis` faded in over the end of `a` (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[axis], b.shape[axis], blend_extent)
    before, after = _seam_weights(extent, b.device, axis)
    start_of_b = b.narrow(axis, 0, extent)
    end_of_a = a.narrow(axis, a.shape[axis] - extent, extent)
    start_of_b.copy_((end_of_a * before).to(b.dtype) + (start_of_b * after).to(b.dtype))
    return b
