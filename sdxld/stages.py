"""The stages: (models, record, settings) -> image. No file I/O here.

Each stage reads what it needs from the Record so that an image is always re-made (or upscaled)
with the prompt, seed and LoRAs that made it, whatever the prompt files say today.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from . import diffusers_private
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


def _step_callback(hooks: Hooks, phase: str, stage_total: int, done_before: int = 0):
    """Progress over the whole stage: the refiner's steps continue the base's count, so a user sees
    step 7/8 where the refiner runs the last two of eight, not "step 1/2"."""
    def callback(pipe, step, timestep, kwargs):
        hooks.on_step(phase, min(done_before + step + 1, stage_total), stage_total)
        if hooks.should_stop():
            diffusers_private.interrupt(pipe)
        return kwargs

    return callback


def img2img_steps(steps: int, strength: float) -> int:
    """Denoising steps an img2img pass runs: diffusers skips the first (1 - strength) of the schedule."""
    return min(int(steps * strength), steps)


def _generator(device, seed: int):
    import torch

    # CPU generators give the same noise on every machine, so a seed reproduces across GPUs too.
    return torch.Generator("cpu").manual_seed(seed)


NAN_ADVICE = ("usually the fp16 SDXL VAE overflowing; set performance.dtype to bf16 or fp32, or model.vae to "
              "madebyollin/sdxl-vae-fp16-fix")


def to_pil(array: np.ndarray, what: str):
    """Float images in [0, 1] -> PIL, refusing NaN images instead of saving them black."""
    from PIL import Image

    if not np.isfinite(array).all():
        raise NaNImageError(f"{what} produced NaN pixels ({NAN_ADVICE})")
    image = (np.clip(array[0], 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(image)


def tensor_to_pil(images, what: str) -> list:
    """A pipeline's images as tensors (N, C, H, W) in [0, 1] -> PIL images, the same pixels
    to_pil makes, but checked and made 8-bit where the tensors are: a 3072x5376 final crosses to
    the CPU as 50 MB of bytes instead of 200 MB of floats, and the CPU's numpy passes over it
    (0.43 s on two cores, bench/host_costs.py) are gone."""
    import torch
    from PIL import Image

    # One copy, laid out as PIL wants (height, width, channel), then in place: the fewest passes
    # over the floats, so that on a CPU-only machine this is no slower than the numpy path was.
    pixels = images.permute(0, 2, 3, 1).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if not bool(torch.isfinite(pixels).all()):
        raise NaNImageError(f"{what} produced NaN pixels ({NAN_ADVICE})")
    quantized = pixels.clamp_(0, 1).mul_(255).round_().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(image) for image in quantized]


def pil_to_tensor(image, device, dtype):
    """An RGB image as the VAE takes it, (1, 3, H, W) in [-1, 1], the values diffusers' preprocess
    gives (its float math, in the same order), with the scaling done on the device."""
    import torch

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # Batch dimension first, then the permute: the strides diffusers' preprocess gives
    # (channels-last), which choose the VAE's convolution kernels, so the latent is bit for bit the same.
    pixels = torch.from_numpy(np.array(rgb))[None].to(device).permute(0, 3, 1, 2)
    return (pixels.float() / 255.0 * 2.0 - 1.0).to(dtype)


def prompt_embeddings(pipe, record: Record):
    """The record's prompt as this pipeline's text encoders see it (long prompts and weights included)."""
    return batch_prompt_embeddings(pipe, [record])[0]


def batch_prompt_embeddings(pipe, records: list[Record]) -> list:
    """prompt_embeddings of each record, a text the records share encoded once."""
    from .conditioning import encode_all

    return encode_all(pipe, [(record.prompt, record.negative, record.prompt_syntax) for record in records])


def stage1(models, record: Record, hooks: Hooks | None = None):
    """Text to image at the base size, with the refiner taking over at `refiner_split` if recorded."""
    return stage1_batch(models, [record], hooks)[0]


BATCH_SHARED = ("sampler", "width", "height", "steps", "cfg", "refiner_split")


def stage1_batch(models, records: list[Record], hooks: Hooks | None = None,
                 while_card_works: Callable[[], None] | None = None, base_embeddings: list | None = None) -> list:
    """Stage 1 of several records, one UNet call per step for all of them. They share the sampler,
    size, steps, CFG and refiner split, and the LoRAs merged into the model (the caller's part);
    each keeps its own prompt, negative and seed: a CPU generator per image, so each image is the
    one its record makes alone. Prompts whose embeddings differ in length (one more 75-token
    chunk) would need padding that changes them: such records run in calls of their own.

    `while_card_works`: host work to do once every call is queued and before the images are read
    back. On a GPU the pipeline returns when the host has queued the work (under CUDA graphs, or
    with a batch that keeps the card busy, it should be well before the card is done), and
    reading the pixels waits for the card: what runs in between should cost no card time.
    `base_embeddings`: the records' prompts through the base's text encoders, if already encoded."""
    hooks = hooks or Hooks()
    lead = records[0]
    for record in records[1:]:
        differing = [key for key in BATCH_SHARED if getattr(record, key) != getattr(lead, key)]
        if differing:
            raise ValueError(f"a stage-1 batch must share {', '.join(differing)}")
    models.set_sampler(lead.sampler)
    use_refiner = models.refiner is not None and lead.refiner_split is not None
    common = dict(num_inference_steps=lead.steps, guidance_scale=lead.cfg)
    decoded: list[tuple[list[int], object]] = []  # (record indices, their images on the device)
    if base_embeddings is None:
        base_embeddings = batch_prompt_embeddings(models.base, records)
    for indices in _unet_batches(base_embeddings, models.static_shapes):
        generators = [_generator(models.device, records[i].seed) for i in indices]
        generator = generators if len(generators) > 1 else generators[0]
        result = models.base(
            **common,
            **_stacked([base_embeddings[i] for i in indices]),
            width=lead.width,
            height=lead.height,
            generator=generator,
            denoising_end=lead.refiner_split if use_refiner else None,
            output_type="latent" if use_refiner else "pt",
            callback_on_step_end=_step_callback(hooks, "stage1", lead.steps),
        )
        if hooks.should_stop():
            raise Interrupted("stage 1 interrupted")
        if not use_refiner:
            decoded.append((indices, result.images))
            continue
        latents = result.images
        refiner_embeddings = batch_prompt_embeddings(models.refiner, [records[i] for i in indices])
        for rows in _unet_batches(refiner_embeddings, models.static_shapes):
            refined = models.refiner(
                **common,
                **_stacked([refiner_embeddings[row] for row in rows]),
                image=latents[rows],
                # Each image's generator goes on from where the base left it, as when made alone.
                generator=[generators[row] for row in rows] if len(rows) > 1 else generators[rows[0]],
                denoising_start=lead.refiner_split,
                output_type="pt",
                callback_on_step_end=_step_callback(hooks, "stage1 refiner", lead.steps, models.base.num_timesteps),
            )
            if hooks.should_stop():
                raise Interrupted("stage 1 interrupted")
            decoded.append(([indices[row] for row in rows], refined.images))
    if while_card_works is not None:
        while_card_works()
    images: list = [None] * len(records)
    for indices, tensors in decoded:
        for i, image in zip(indices, tensor_to_pil(tensors, "stage 1")):
            images[i] = image
    return images


def _unet_batches(embeddings: list, static_shapes: bool) -> list[list[int]]:
    """Indices of the embeddings that can share a call (same shapes), in order of first appearance.

    With static shapes (compile graphs and max: a UNet build per shape, minutes each) a group runs in
    powers of two, 7 = 4 + 2 + 1: at most five batch shapes however the batches fall."""
    groups: dict[tuple, list[int]] = {}
    for index, embedding in enumerate(embeddings):
        key = (tuple(embedding.prompt_embeds.shape), tuple(embedding.negative_embeds.shape))
        groups.setdefault(key, []).append(index)
    if not static_shapes:
        return list(groups.values())
    calls = []
    for group in groups.values():
        while group:
            size = 1 << (len(group).bit_length() - 1)
            calls.append(group[:size])
            group = group[size:]
    return calls


def _stacked(embeddings: list) -> dict:
    """One pipeline call's prompt keyword arguments for several images (batch = first dimension)."""
    import torch

    per_image = [embedding.pipeline_kwargs() for embedding in embeddings]
    return {key: torch.cat([kwargs[key] for kwargs in per_image]) for key in per_image[0]}


# --- stages 2 and 3 ------------------------------------------------------------------------

STAGE2_SEED_OFFSET = 9001
STAGE3_SEED_OFFSET = 18001
TILE_SEED_STRIDE = 1337


def _refine(models, record: Record, image, *, steps, cfg, strength, split, seed, hooks, phase, micro=None):
    """img2img at `strength`, the refiner taking over at `split` (None: base only). Returns the
    image as a (3, H, W) tensor in [0, 1], on the pipeline's device.

    The base covers the denoising fraction [1 - strength, split] and the refiner [split, 1]. When
    the whole img2img lies past the split there is nothing for the base to do: the refiner alone
    runs it.
    """
    use_refiner = models.refiner is not None and split is not None
    generator = _generator(models.device, seed)
    common = dict(num_inference_steps=steps, guidance_scale=cfg)
    micro = micro or {}
    total = img2img_steps(steps, strength)
    # The refiner's time ids carry an aesthetic score instead of a target size.
    refiner_micro = {k: v for k, v in micro.items() if k != "target_size"}
    if use_refiner and 1 - strength >= split:
        result = models.refiner(
            **common, **prompt_embeddings(models.refiner, record).pipeline_kwargs(),
            image=image, strength=strength, generator=generator, output_type="pt",
            callback_on_step_end=_step_callback(hooks, f"{phase} refiner", total),
            **refiner_micro,
        )
        if hooks.should_stop():
            raise Interrupted(f"{phase} interrupted")
        return result.images[0]
    result = models.img2img(
        **common,
        **prompt_embeddings(models.img2img, record).pipeline_kwargs(),
        image=image,
        strength=strength,
        generator=generator,
        denoising_end=split if use_refiner else None,
        output_type="latent" if use_refiner else "pt",
        callback_on_step_end=_step_callback(hooks, phase, total),
        **micro,
    )
    if hooks.should_stop():
        raise Interrupted(f"{phase} interrupted")
    if use_refiner:
        result = models.refiner(
            **common,
            **prompt_embeddings(models.refiner, record).pipeline_kwargs(),
            image=result.images,
            generator=generator,
            denoising_start=split,
            output_type="pt",
            callback_on_step_end=_step_callback(hooks, f"{phase} refiner", total, models.img2img.num_timesteps),
            **refiner_micro,
        )
        if hooks.should_stop():
            raise Interrupted(f"{phase} interrupted")
    return result.images[0]


def stage2(models, record: Record, stage1_image, settings, size: tuple[int, int], hooks: Hooks | None = None):
    """Lanczos to the mid size, then img2img (generate.py's stage 2). Returns (upscaled, refined)."""
    from PIL import Image

    hooks = hooks or Hooks()
    upscaled = stage1_image.convert("RGB").resize(size, Image.LANCZOS)
    if not settings.enabled:
        return upscaled, upscaled
    models.set_sampler(record.sampler)
    pixels = _refine(
        models, record, upscaled,
        steps=settings.steps, cfg=settings.cfg, strength=settings.strength,
        split=settings.denoise_split if settings.use_refiner else None,
        seed=record.seed + STAGE2_SEED_OFFSET, hooks=hooks, phase="stage2",
    )
    return upscaled, tensor_to_pil(pixels[None], "stage 2")[0]


def stage3_pixel(models, record: Record, image, settings, hooks: Hooks | None = None, on_tile=None):
    """generate.py's stage 3: img2img each tile on its own, blend with ramps over the overlap."""
    from .tiling import blend, tile_grid

    hooks = hooks or Hooks()
    models.set_sampler(record.sampler)
    width, height = image.size
    tiles = tile_grid(width, height, settings.tile_size, settings.tile_overlap, settings.tile_fit)
    refined = []
    base_seed = record.seed + STAGE3_SEED_OFFSET
    for index, tile in enumerate(tiles):
        crop = image.crop((tile.x, tile.y, tile.x + tile.width, tile.y + tile.height))
        # SDXL's micro-conditioning describes exactly this: a crop of a larger image.
        micro = dict(original_size=(height, width), crops_coords_top_left=(tile.y, tile.x), target_size=(tile.height, tile.width))
        pixels = _refine(
            models, record, crop,
            steps=settings.steps, cfg=settings.cfg, strength=settings.strength,
            split=settings.denoise_split if settings.use_refiner else None,
            seed=base_seed + index * TILE_SEED_STRIDE, hooks=hooks, phase=f"stage3 tile {index + 1}/{len(tiles)}",
            micro=micro,
        )
        # The blend runs on the CPU in floats: one download, and the tile image made from it.
        pixels = pixels.float().permute(1, 2, 0).cpu().numpy()
        tile_image = to_pil(pixels[None], f"stage 3 tile {index}")  # refuses NaN tiles
        refined.append((tile, pixels))
        if on_tile is not None:
            on_tile(index, tile_image)
    return to_pil(blend(refined, width, height, settings.tile_overlap, settings.blend_mode)[None], "stage 3"), len(tiles)


@contextlib.contextmanager
def vae_in_fp32(vae):
    """fp16 SDXL VAE overflows: run it in fp32 like the diffusers pipelines do (force_upcast).

    Always cast back, whatever happens inside: the VAE is shared, and one left in fp32 after an
    out-of-memory retry made every later fp16 decode fail on mixed dtypes."""
    import torch

    if vae.dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        yield
        return
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(torch.float16)


def stage3_latent(models, record: Record, image, settings, hooks: Hooks | None = None, while_card_works=None):
    """Tiled refinement in latent space: one latent, per-step fusion of per-tile UNet predictions.
    `while_card_works`: host work to do once the steps and the decode are queued, before the
    final's pixels are read back."""
    import torch

    from .host_waits import queued_copy
    from .tiling import tile_grid, tiled_denoise

    hooks = hooks or Hooks()
    models.set_sampler(record.sampler)
    pipe = models.img2img
    device = models.execution_device
    width, height = image.size
    factor = pipe.vae_scale_factor
    pixel_tiles = tile_grid(width, height, settings.tile_size, settings.tile_overlap, settings.tile_fit)
    latent_tiles = [t.scaled(factor) for t in pixel_tiles]
    generator = _generator(device, record.seed + STAGE3_SEED_OFFSET)

    with torch.no_grad():
        with vae_in_fp32(pipe.vae):
            pixels = pil_to_tensor(image, device, pipe.vae.dtype)
            init = _sample_without_wait(pipe.vae.encode(pixels).latent_dist, generator) * pipe.vae.config.scaling_factor

        # Until add_noise (diffusers' copies the schedule's sigmas with a blocking copy) nothing
        # waits for the card: the prompts' encoding, a few thousand operations the host
        # dispatches one by one, is done while the card encodes the image (16.5 MP at 3072x5376).
        phases = [(0, _conditioning(pipe, record, settings.cfg, (height, width), device))]
        pipe.scheduler.set_timesteps(settings.steps, device=device)
        timesteps, _ = pipe.get_timesteps(settings.steps, settings.strength, device)
        if models.refiner is not None and settings.use_refiner:
            cutoff = round(pipe.scheduler.config.num_train_timesteps * (1 - settings.denoise_split))
            on_host = _timesteps_on_host(pipe.scheduler, timesteps)
            handoff = next((i for i, t in enumerate(on_host) if t < cutoff), len(on_host))
            phases.append((handoff, _conditioning(models.refiner, record, settings.cfg, (height, width), device)))
        noise = queued_copy(torch.randn(init.shape, generator=generator, dtype=torch.float32), device)
        latents = pipe.scheduler.add_noise(init.float(), noise, timesteps[:1])

        def on_step(step, total):
            hooks.on_step("stage3 latent", step, total)
            return hooks.should_stop()

        # Ancestral and SDE samplers draw fresh noise at every step: from the seeded generator
        # (diffusers' own rule for which schedulers take one), or the same seed gives new pixels.
        step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)
        latents = tiled_denoise(latents, list(timesteps), pipe.scheduler, phases, latent_tiles, pixel_tiles,
                                auto_tile_batch(settings, device), on_step, step_kwargs)
        if hooks.should_stop():
            raise Interrupted("stage 3 interrupted")
        with vae_in_fp32(pipe.vae):
            decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        if while_card_works is not None:
            while_card_works()
        final = tensor_to_pil(pipe.image_processor.postprocess(decoded.float(), output_type="pt"), "stage 3")[0]
    return final, len(pixel_tiles)


def _sample_without_wait(latent_dist, generator):
    """diffusers' DiagonalGaussianDistribution.sample(generator): the same numbers from the same
    generator, copied to the device without making the host wait for the encoder to finish."""
    from .samplers import noise_without_wait

    return latent_dist.mean + latent_dist.std * noise_without_wait(latent_dist.mean, generator)


def _timesteps_on_host(scheduler, timesteps) -> list:
    """`timesteps` (a tail of the scheduler's) as numbers, from the host copy sdxld's schedulers
    keep; read back from the device (a wait) only for a scheduler of diffusers' own."""
    from .samplers import timesteps_on_host

    kept = timesteps_on_host(scheduler)
    if kept is None:
        return timesteps.tolist()
    return kept[len(kept) - len(timesteps):].tolist()


def _conditioning(pipe, record: Record, cfg: float, original_size, device):
    """Prompt embeddings and a per-tile time-id function for one pipeline (base or refiner)."""
    import torch

    from .host_waits import queued_copy
    from .tiling import Conditioning

    prompt = prompt_embeddings(pipe, record)

    # Made once per tile and queued: a blocking copy at every UNet call made the host wait for
    # the card to finish the previous call before it could queue the next one.
    @functools.cache
    def time_ids(tile):
        positive, negative_ids = diffusers_private.img2img_time_ids(
            pipe, original_size, (tile.y, tile.x), (tile.height, tile.width), prompt.prompt_embeds.dtype)
        return queued_copy(torch.cat([negative_ids, positive]), device)

    return Conditioning(
        unet=pipe.unet,
        prompt_embeds=torch.cat([prompt.negative_embeds, prompt.prompt_embeds]),
        pooled=torch.cat([prompt.negative_pooled, prompt.pooled]),
        time_ids=time_ids,
        guidance=cfg,
    )


# Peak VRAM of one latent tile of 2048x2048 px in the UNet (batch of 2 for CFG), measured on an
# H200 (bf16): tile_batch 2 peaked at 14.1 GiB, tile_batch 4 at 17.1 GiB.
GIB = 1024**3
TILE_2048_BYTES = 1.5 * GIB
MIN_RETRY_TILE = 256


def out_of_memory_error():
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def auto_tile_batch(settings, device) -> int:
    """tile_batch for 'auto': 2 (faster than 1, no slower than 4 on an H200), 1 when the free
    VRAM would not hold two tiles' activations with room to spare."""
    import torch

    if settings.tile_batch != "auto":
        return settings.tile_batch
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return 2
    free, _ = torch.cuda.mem_get_info(device)
    per_tile = TILE_2048_BYTES * (settings.tile_size / 2048) ** 2
    return 2 if free > 2 * per_tile + 2 * GIB else 1


AUTO_BATCH_MOST = 8
AUTO_BATCH_VRAM_SHARE = 0.8


def auto_stage1_batch(free_bytes: int | None, image_bytes: int | None) -> int:
    """batch_size 'auto' on a GPU: as many images as AUTO_BATCH_VRAM_SHARE of the free VRAM holds
    at `image_bytes` each (one image's measured peak working memory), at most AUTO_BATCH_MOST;
    1 until an image has been measured."""
    if not free_bytes or not image_bytes:
        return 1
    return max(1, min(AUTO_BATCH_MOST, int(AUTO_BATCH_VRAM_SHARE * free_bytes // image_bytes)))


def smaller_stage3(settings):
    """The next try after running out of memory: one tile per UNet call, then half-size tiles."""
    if settings.mode == "latent" and settings.tile_batch > 1:
        return replace(settings, tile_batch=1)
    size = settings.tile_size // 2 // 8 * 8
    if size < MIN_RETRY_TILE:
        return None
    overlap = min(settings.tile_overlap, (size // 2 - 8) // 8 * 8)
    return replace(settings, tile_size=size, tile_overlap=overlap)


def upscale_for_stage3(models, upscaler, image, size: tuple[int, int]):
    """Stage 3's first half: the ESRGAN-family upscale (or Lanczos) to the final size. Under
    model_offload the diffusion models leave the GPU first, so the upscaler has it to itself."""
    if models.residency is not None:
        models.residency.evict()
    return upscaler.upscale(image, size)


def stage3(models, record: Record, image, settings, hooks: Hooks | None = None, on_tile=None, while_card_works=None):
    """Stage 3's second half in the configured mode (disabled: the image as it is), retried with less work per UNet call when the GPU runs out
    of memory (another process took VRAM, a larger image than usual). Returns the image, the tile
    count, the settings that succeeded and a note per retry for the record. `while_card_works`:
    host work for while the card runs latent mode's steps (stage1_batch's); in pixel mode, whose
    tiles come back one by one, and when disabled, it runs at the end."""
    import gc

    import torch

    if not settings.enabled:
        if while_card_works is not None:
            while_card_works()
        return image, 0, settings, []
    attempt = replace(settings, tile_batch=auto_tile_batch(settings, models.execution_device))
    notes: list[str] = []
    while True:
        # A retry's smaller shapes would be compile builds of minutes under compile_approved.
        with models.no_new_builds() if notes else contextlib.nullcontext():
            try:
                if attempt.mode == "pixel":
                    final, tiles = stage3_pixel(models, record, image, attempt, hooks, on_tile=on_tile)
                    if while_card_works is not None:
                        while_card_works()
                else:
                    final, tiles = stage3_latent(models, record, image, attempt, hooks, while_card_works)
                return final, tiles, attempt, notes
            except out_of_memory_error():
                smaller = smaller_stage3(attempt)
                if smaller is None:
                    raise
                notes.append(
                    f"stage 3 ran out of GPU memory at tile_batch {attempt.tile_batch}, tile_size {attempt.tile_size}; "
                    f"retried with tile_batch {smaller.tile_batch}, tile_size {smaller.tile_size}"
                )
                attempt = smaller
        # Outside the except block: the traceback no longer pins the failed attempt's tensors.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
