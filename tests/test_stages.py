"""Stages 2 and 3 on the tiny model: sizes, seeds, both tiling modes, UNet call counts, records."""

import math

import numpy as np
import pytest
from support.esrgan_weights import write_esrgan
from PIL import Image

from sdxld.records import parse_a1111, read_png_record
from sdxld.stages import Hooks, Interrupted, stage2, stage3_latent
from sdxld.tiling import tile_grid
from sdxld.tiny import write_tiny_lora


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("use_refiner", [False, True])
@pytest.mark.parametrize("tile_batch", [1, 4])
def test_latent_mode_calls_the_unet_once_per_tile_batch_per_step(make_engine, use_refiner, tile_batch):
    engine = make_engine(generation__stage3__tile_batch=tile_batch, generation__stage3__use_refiner=use_refiner,
                         generation__stage3__steps=10, generation__stage3__strength=0.5)
    first = engine.stage1_once(seed=1)
    settings = engine.config.generation.stage3
    image = first.image.resize((512, 896))
    base_calls, h1 = count_calls(engine.models.base.unet)
    refiner_calls, h2 = count_calls(engine.models.refiner.unet)
    steps = []
    try:
        final, tiles = stage3_latent(engine.models, first.record, image, settings,
                                     Hooks(on_step=lambda phase, step, total: steps.append(total)))
    finally:
        h1.remove()
        h2.remove()
    assert final.size == (512, 896)
    assert tiles == len(tile_grid(512, 896, settings.tile_size, settings.tile_overlap)) == 6
    effective = steps[-1]
    assert effective == 5  # 10 steps at strength 0.5
    assert len(base_calls) + len(refiner_calls) == math.ceil(tiles / tile_batch) * effective
    assert bool(refiner_calls) == use_refiner
    # Each call carries the negative and positive halves of every tile in its batch.
    assert max(base_calls + refiner_calls) == 2 * min(tile_batch, tiles)


def test_stage2_upscales_to_the_mid_size_with_its_own_seed(make_engine):
    engine = make_engine()
    first = engine.stage1_once(seed=4)
    settings = engine.config.generation.stage2
    upscaled, refined = stage2(engine.models, first.record, first.image, settings, (256, 448))
    assert upscaled.size == refined.size == (256, 448)
    assert np.abs(np.asarray(refined, dtype=int) - np.asarray(upscaled, dtype=int)).mean() > 1
    again = stage2(engine.models, first.record, first.image, settings, (256, 448))[1]
    assert np.array_equal(np.asarray(refined), np.asarray(again))


def test_disabled_stage2_is_a_plain_lanczos_resize(make_engine):
    engine = make_engine(generation__stage2__enabled=False)
    first = engine.stage1_once(seed=4)
    upscaled, refined = stage2(engine.models, first.record, first.image, engine.config.generation.stage2, (256, 448))
    assert refined is upscaled
    assert np.array_equal(np.asarray(refined), np.asarray(first.image.resize((256, 448), Image.LANCZOS)))


@pytest.mark.parametrize("mode", ["latent", "pixel"])
def test_full_upscale_makes_a_4x_final_with_its_record(make_engine, mode):
    engine = make_engine(generation__stage3__mode=mode)
    first = engine.stage1_once(seed=6)
    result = engine.upscale(first.record, first.image)
    assert result.path.name == f"{first.record.tag}_final_512x896.png"
    with Image.open(result.path) as image:
        assert image.size == (512, 896)
        params = parse_a1111(image.text["parameters"])
    record = read_png_record(result.path)
    assert record.files == {"stage1": first.path.name, "final": result.path.name}
    assert record.stages["stage3"]["mode"] == mode and record.stages["stage3"]["tiles"] == 6
    assert record.stages["stage3"]["upscaler"] == "lanczos"
    assert record.stages["stage2"]["seed"] == 6 + 9001 and record.stages["stage3"]["seed"] == 6 + 18001
    assert (params["Hires upscale"], params["Hires upscaler"], params["Denoising strength"]) == ("4", "lanczos", "0.4")
    assert params["Size"] == "128x224" and params["Seed"] == "6"
    # The metadata JSON was updated (atomically) with the final's name.
    saved = (engine.layout.metadata / f"{first.record.tag}.json").read_text()
    assert result.path.name in saved


@pytest.mark.parametrize("mode", ["latent", "pixel"])
def test_shrunk_tiles_reach_the_unet_and_the_record(make_engine, mode):
    engine = make_engine(generation__stage3__mode=mode, generation__stage3__tile_fit="shrink_tiles",
                         generation__stage3__use_refiner=False)
    first = engine.stage1_once(seed=6)
    latent_sizes = []
    handle = engine.models.base.unet.register_forward_hook(lambda mod, args, out: latent_sizes.append(tuple(args[0].shape[-2:])))
    try:
        result = engine.upscale(first.record, first.image)
    finally:
        handle.remove()
    # The demo's 512x896 final in 352-pixel tiles overlapping by 48: 2x3 tiles of 320x336, not 352x352.
    assert tile_grid(512, 896, 352, 48, "shrink_tiles")[0].width == 320
    stage3_sizes = set(latent_sizes[-3:])
    assert stage3_sizes == {(336 // 8, 320 // 8)}
    stage3 = result.record.stages["stage3"]
    assert (stage3["tile_fit"], stage3["tiles"]) == ("shrink_tiles", 6)
    with Image.open(result.path) as image:
        assert image.size == (512, 896)


def test_esrgan_weights_are_used_and_recorded(root, make_engine):
    write_esrgan(root / "weights" / "RealESRGAN_x4plus_anime_6B.pth", "new")
    engine = make_engine()
    first = engine.stage1_once(seed=2)
    record = engine.upscale(first.record, first.image).record
    assert record.stages["stage3"]["upscaler"] == "ESRGAN x4 (RealESRGAN_x4plus_anime_6B.pth)"


def test_stage2_and_3_use_the_records_prompt_and_loras_not_the_current_files(root, make_engine):
    write_tiny_lora(root / "loras/style/ink.safetensors", seed=1)
    engine = make_engine()
    first = engine.stage1_once(seed=8)
    assert [u.name for u in first.record.loras] == ["ink"]
    baseline = np.asarray(Image.open(engine.upscale(first.record, first.image).path))

    (root / "prompts" / "manual_prompt.txt").write_text("something else entirely")
    (engine.layout.final / f"{first.record.tag}_final_512x896.png").unlink()
    write_tiny_lora(root / "loras/style/other.safetensors", seed=2)
    again = engine.upscale(first.record, first.image)
    assert np.array_equal(baseline, np.asarray(Image.open(again.path)))
    assert again.notes == []


def test_a_lora_that_left_is_noted_in_the_final_record(root, make_engine):
    lora = write_tiny_lora(root / "loras/character/alice.safetensors", seed=1)
    engine = make_engine()
    first = engine.stage1_once(seed=9)
    lora.unlink()
    result = engine.upscale(first.record, first.image)
    assert result.notes == ["LoRA character/alice is no longer available; upscaled without it"]
    assert read_png_record(result.path).stages["notes"] == result.notes


def test_intermediates_use_the_seeds_names(make_engine):
    engine = make_engine(output__save_intermediates=True, generation__stage3__mode="pixel")
    first = engine.stage1_once(seed=3)
    engine.upscale(first.record, first.image)
    tag = first.record.tag
    folder = engine.layout.intermediates
    assert (folder / "stage2_up" / f"{tag}_stage2_up_256x448.png").exists()
    assert (folder / "stage2" / f"{tag}_stage2_256x448.png").exists()
    assert (folder / "stage3_up" / f"{tag}_stage3_up_512x896.png").exists()
    assert sorted(p.name for p in (folder / "tiles").iterdir()) == [f"{tag}_tile_{i:03d}.png" for i in range(6)]


def test_stopping_during_stage3_saves_no_final(make_engine):
    engine = make_engine()
    first = engine.stage1_once(seed=5)
    seen = []
    hooks = Hooks(should_stop=lambda: any(p.startswith("stage3") for p in seen), on_step=lambda p, s, t: seen.append(p))
    with pytest.raises(Interrupted):
        engine.upscale(first.record, first.image, hooks)
    assert list(engine.layout.final.iterdir()) == []


class OutOfMemoryWhen:
    """Wraps a UNet so that calls matching a condition raise torch's real out-of-memory error,
    as CUDA does when a tile batch does not fit."""

    def __init__(self, unet, condition):
        import torch

        self.calls, self.failures = [], 0
        original = unet.forward

        def forward(sample, *args, **kwargs):
            self.calls.append(tuple(sample.shape))
            if condition(sample):
                self.failures += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            return original(sample, *args, **kwargs)

        unet.forward = forward


def test_stage3_out_of_memory_retries_with_one_tile_per_call_then_smaller_tiles(make_engine):
    from sdxld.stages import stage3

    engine = make_engine(generation__stage3__tile_batch=2, generation__stage3__tile_size=512,
                         generation__stage3__tile_overlap=64, generation__stage3__use_refiner=False)
    first = engine.stage1_once(seed=3)
    image = first.image.resize((512, 896))
    # Too much at once: more than one tile per call, or tiles over 256 px (32 latent pixels).
    oom = OutOfMemoryWhen(engine.models.base.unet, lambda sample: sample.shape[0] > 2 or sample.shape[-1] > 32)
    final, tiles, used, notes = stage3(engine.models, first.record, image, engine.config.generation.stage3)
    assert final.size == (512, 896)
    assert (used.tile_batch, used.tile_size, used.tile_overlap) == (1, 256, 64)
    assert tiles == len(tile_grid(512, 896, 256, 64))
    assert oom.failures == 2
    assert notes == [
        "stage 3 ran out of GPU memory at tile_batch 2, tile_size 512; retried with tile_batch 1, tile_size 512",
        "stage 3 ran out of GPU memory at tile_batch 1, tile_size 512; retried with tile_batch 1, tile_size 256",
    ]


def test_stage3_gives_up_with_the_error_when_even_the_smallest_tiles_do_not_fit(make_engine):
    import torch

    from sdxld.stages import stage3

    engine = make_engine(generation__stage3__tile_batch=2, generation__stage3__tile_size=512,
                         generation__stage3__tile_overlap=64, generation__stage3__use_refiner=False)
    first = engine.stage1_once(seed=3)
    oom = OutOfMemoryWhen(engine.models.base.unet, lambda sample: True)
    with pytest.raises(torch.OutOfMemoryError):
        stage3(engine.models, first.record, first.image.resize((512, 896)), engine.config.generation.stage3)
    assert oom.failures == 3  # tile_batch 2, tile_batch 1, 256 px tiles; 128 px is below the floor


def test_an_out_of_memory_retry_is_written_into_the_final_record(make_engine, root):
    engine = make_engine(generation__stage3__tile_batch=2, generation__stage3__use_refiner=False)
    first = engine.stage1_once(seed=5)
    OutOfMemoryWhen(engine.models.base.unet, lambda sample: sample.shape[0] > 2)
    result = engine.upscale(first.record, first.image)
    record = read_png_record(result.path)
    assert record.stages["stage3"]["tile_batch"] == 1
    assert any("ran out of GPU memory at tile_batch 2" in note for note in record.stages["notes"])


def test_progress_counts_the_whole_stage_with_the_refiners_steps_following_the_bases(make_engine):
    """Status shows "step 7/8 (refiner)" for an 8-step record, never the refiner's own "1/2"."""
    engine = make_engine(generation__stage2__steps=10, generation__stage2__strength=0.5)
    assert engine.models.refiner is not None
    seen = []
    first = engine.stage1_once(seed=5, hooks=Hooks(on_step=lambda phase, step, total: seen.append((phase, step, total))))
    assert first.record.steps == 8
    assert [step for _, step, _ in seen] == list(range(1, 9))
    assert {total for _, _, total in seen} == {8}
    assert seen[0][0] == "stage1" and seen[-1][0] == "stage1 refiner"

    seen.clear()
    settings = engine.config.generation.stage2
    stage2(engine.models, first.record, first.image, settings, (256, 448),
           Hooks(on_step=lambda phase, step, total: seen.append((phase, step, total))))
    assert [step for _, step, _ in seen] == [1, 2, 3, 4, 5]  # 10 steps at strength 0.5
    assert {total for _, _, total in seen} == {5}
    assert seen[-1][0] == "stage2 refiner"


def test_images_become_8_bit_on_the_device_with_the_pixels_the_numpy_path_made():
    import torch

    from sdxld.stages import tensor_to_pil, to_pil

    levels = torch.arange(256).float() / 255
    edges = torch.cat([levels, levels + 0.5 / 255, levels - 0.5 / 255, torch.tensor([-0.3, 1.7, 0.0, 1.0])])
    images = torch.cat([edges, torch.rand(2 * 3 * 16 * 16 - edges.numel())]).reshape(2, 3, 16, 16)
    for dtype in (torch.float32, torch.bfloat16):
        as_numpy = images.to(dtype).permute(0, 2, 3, 1).float().numpy()  # what the pipelines' "np" output was
        made = tensor_to_pil(images.to(dtype), "test")
        for index, image in enumerate(made):
            assert np.array_equal(np.asarray(image), np.asarray(to_pil(as_numpy[index:index + 1], "test")))


def test_a_nan_image_is_refused_on_the_device_too():
    import torch

    from sdxld.stages import NaNImageError, tensor_to_pil

    images = torch.rand(1, 3, 8, 8)
    images[0, 1, 2, 3] = float("nan")
    with pytest.raises(NaNImageError, match="stage 3 produced NaN pixels.*bf16"):
        tensor_to_pil(images, "stage 3")


def test_the_vae_gets_the_values_and_memory_layout_of_diffusers_preprocess():
    """Same values and strides: the strides pick the VAE's convolution kernels, so anything else
    would move the final's pixels (it did: a contiguous tensor changed a latent-mode final)."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from sdxld.stages import pil_to_tensor

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess(image)
    for dtype in (torch.float32, torch.bfloat16):
        made = pil_to_tensor(image, "cpu", dtype)
        assert torch.equal(made, expected.to(dtype)) and made.stride() == expected.stride()


@pytest.mark.parametrize("sampler", ["UniPC", "Euler a"])
def test_the_refiners_call_queues_its_steps_without_waiting_for_the_bases(sampler):
    """At stage 1's and stage 2's hand-off the refiner's pipeline call sets itself up and queues
    every step while the card still runs the base's: its timesteps and time ids are copied
    without blocking and nothing is read back. PyTorch's meta device stands in for the card:
    reading a value from it fails, and a blocking copy to it is counted."""
    import torch

    from sdxld.host_waits import CountHostWaits
    from sdxld.models import ModelBank, img2img_from, make_scheduler
    from sdxld.records import Record
    from sdxld.stages import _step_callback, prompt_embeddings
    from sdxld.tiny import build_pipelines

    base, refiner = build_pipelines()
    refiner.scheduler = make_scheduler(sampler, refiner.scheduler.config)
    for model in (base, refiner):
        model.to("meta")
    ModelBank(base=base, img2img=img2img_from(base), refiner=refiner, device="meta", dtype_name="fp32", base_id="tiny")
    record = Record(tag="t", prompt="a cat, (red scarf:1.2)", negative="blurry", seed=1, width=128, height=224,
                    sampler=sampler, steps=10, cfg=5.0, prompt_syntax="a1111")
    embeddings = prompt_embeddings(refiner, record).pipeline_kwargs()
    base_latents = torch.empty(1, 4, 224 // 8, 128 // 8, device="meta")
    steps = []
    callback = _step_callback(Hooks(on_step=lambda phase, step, total: steps.append(step)), "stage1 refiner", 10, 8)
    with CountHostWaits() as waits:
        refined = refiner(**embeddings, image=base_latents, num_inference_steps=10, guidance_scale=5.0,
                          denoising_start=0.8, generator=torch.Generator().manual_seed(1), output_type="pt",
                          callback_on_step_end=callback)
    assert steps == [9, 10] and refined.images.shape == (1, 3, 224, 128), "the refiner's last two steps ran"
    assert not waits.counts, f"the host waited for the card: {dict(waits.counts)}"


@pytest.mark.parametrize("sampler", ["UniPC", "Euler a"])
def test_on_cuda_the_refiners_call_queues_its_steps_without_synchronizing(sampler):
    """The meta device's count above, on a card: torch raises at any synchronizing CUDA call."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU; this machine has none")
    from sdxld.models import ModelBank, img2img_from, make_scheduler
    from sdxld.records import Record
    from sdxld.stages import prompt_embeddings
    from sdxld.tiny import build_pipelines

    base, refiner = build_pipelines()
    refiner.scheduler = make_scheduler(sampler, refiner.scheduler.config)
    for model in (base, refiner):
        model.to("cuda")
    ModelBank(base=base, img2img=img2img_from(base), refiner=refiner, device="cuda", dtype_name="fp32", base_id="tiny")
    record = Record(tag="t", prompt="a cat", negative="blurry", seed=1, width=128, height=224, sampler=sampler,
                    steps=10, cfg=5.0, prompt_syntax="a1111")
    embeddings = prompt_embeddings(refiner, record).pipeline_kwargs()
    base_latents = torch.randn(1, 4, 224 // 8, 128 // 8, generator=torch.Generator().manual_seed(0)).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        refined = refiner(**embeddings, image=base_latents, num_inference_steps=10, guidance_scale=5.0,
                          denoising_start=0.8, generator=torch.Generator().manual_seed(1), output_type="latent")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert refined.images.shape == (1, 4, 28, 16)


class StopAtThePixels(Exception):
    """The final's pixels read back: the meta device has none to give."""


def test_stage3_encodes_its_prompts_while_the_card_encodes_the_image(monkeypatch):
    """Stage 3 starts with the VAE encoding the whole upscaled image (16.5 MP at the default final
    size). Its set-up queues that, encodes the prompts (a few thousand operations the host
    dispatches one by one) while the card works, and only then waits for the card (diffusers'
    add_noise copies the schedule's sigmas). PyTorch's meta device stands in for the card."""
    import dataclasses

    import sdxld.stages
    from sdxld.config import Stage3Config
    from sdxld.host_waits import CountHostWaits
    from sdxld.models import ModelBank, img2img_from, make_scheduler
    from sdxld.records import Record
    from sdxld.tiny import build_pipelines

    base, refiner = build_pipelines()
    for model in (base, refiner):
        model.scheduler = make_scheduler("UniPC", model.scheduler.config)
        model.to("meta")
    models = ModelBank(base=base, img2img=img2img_from(base), refiner=refiner, device="meta", dtype_name="fp32",
                       base_id="tiny")
    record = Record(tag="t", prompt="a cat, (red scarf:1.2)", negative="blurry", seed=1, width=128, height=224,
                    sampler="UniPC", steps=8, cfg=5.0, prompt_syntax="a1111")
    settings = dataclasses.replace(Stage3Config(), steps=10, tile_size=256, tile_overlap=32)
    waits = CountHostWaits()
    seen = []  # (what ran, host waits so far)
    base.vae.encoder.register_forward_hook(lambda *_: seen.append(("image encoded", waits.counts.total())))
    for encoder in (base.text_encoder, base.text_encoder_2):
        encoder.register_forward_pre_hook(lambda *_: seen.append(("prompts encoded", waits.counts.total())))
    refiner_calls, handle = count_calls(refiner.unet)

    def stop(*_):
        raise StopAtThePixels

    monkeypatch.setattr(sdxld.stages, "tensor_to_pil", stop)
    try:
        with waits, pytest.raises(StopAtThePixels):
            sdxld.stages.stage3_latent(models, record, Image.new("RGB", (256, 448), "gray"), settings)
    finally:
        handle.remove()
    assert seen[0][0] == "image encoded" and {what for what, _ in seen[1:]} == {"prompts encoded"}
    assert {count for _, count in seen} == {seen[0][1]}, f"the host waited for the card before the prompts: {seen}"
    assert refiner_calls, "the refiner took over (its hand-off read from the host's copy of the timesteps)"


def test_stage3s_denoising_loop_never_makes_the_host_wait_for_the_card():
    """Each UNet call of stage 3 is queued while the card still runs the one before: the tiles'
    time ids and blend weights are copied once and without blocking. PyTorch's meta device stands
    in for the card (a blocking copy to it is counted as one to a GPU would be)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from sdxld.host_waits import CountHostWaits
    from sdxld.models import make_scheduler
    from sdxld.records import Record
    from sdxld.stages import _conditioning
    from sdxld.tiling import tiled_denoise
    from sdxld.tiny import build_pipelines

    base, refiner = build_pipelines()
    pipe = StableDiffusionXLImg2ImgPipeline(**base.components)
    pipe.scheduler = make_scheduler("UniPC", pipe.scheduler.config)
    for model in (pipe, refiner):
        model.to("meta")
    record = Record(tag="t", prompt="a cat, (red scarf:1.2)", negative="blurry", seed=1, width=128, height=224,
                    sampler="UniPC", steps=8, cfg=5.0, prompt_syntax="a1111")
    width, height = 512, 896
    pixel_tiles = tile_grid(width, height, 256, 32)
    latent_tiles = [tile.scaled(8) for tile in pixel_tiles]
    phases = [(0, _conditioning(pipe, record, 5.0, (height, width), "meta")),
              (4, _conditioning(refiner, record, 5.0, (height, width), "meta"))]  # the refiner's last 3 steps
    pipe.scheduler.set_timesteps(14, device="meta")
    pipe.scheduler.set_begin_index(7)
    latents = torch.empty(1, 4, height // 8, width // 8, device="meta")
    calls, handle = count_calls(pipe.unet)
    try:
        with CountHostWaits() as waits:
            tiled_denoise(latents, list(pipe.scheduler.timesteps[7:]), pipe.scheduler, phases, latent_tiles,
                          pixel_tiles, 2, lambda step, total: False)
    finally:
        handle.remove()
    assert len(pixel_tiles) == 12 and calls, "the loop ran on the stand-in card"
    assert not waits.counts, f"the host waited for the card: {dict(waits.counts)}"
