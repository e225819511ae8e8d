"""One test per shim over diffusers' private API (sdxld/diffusers_private.py): a diffusers upgrade
that changes one of them fails here, naming the shim, before a stage or the LoRA merger breaks."""

import pytest
import torch

from sdxld import diffusers_private


@pytest.fixture(scope="module")
def models(tiny_cache, tmp_path_factory):
    from support.helpers import demo_config

    from sdxld.init import init_root
    from sdxld.models import load_models

    return load_models(demo_config(init_root(tmp_path_factory.mktemp("root")).root))


def test_execution_device_is_where_the_pipeline_computes(models):
    assert diffusers_private.execution_device(models.base) == torch.device("cpu")


def test_interrupt_from_the_step_callback_stops_the_call_after_that_step(models):
    steps = []

    def callback(pipe, step, timestep, kwargs):
        steps.append(step)
        if step == 1:
            diffusers_private.interrupt(pipe)
        return kwargs

    models.base(prompt="x", num_inference_steps=6, width=64, height=64, output_type="latent",
                callback_on_step_end=callback)
    assert steps == [0, 1]


def test_time_ids_hold_sizes_and_crop_for_the_base_and_the_aesthetic_score_for_the_refiner(models):
    positive, negative = diffusers_private.img2img_time_ids(models.img2img, (896, 512), (16, 32), (352, 352), torch.float32)
    assert positive.tolist() == negative.tolist() == [[896, 512, 16, 32, 352, 352]]
    positive, negative = diffusers_private.img2img_time_ids(models.refiner, (896, 512), (16, 32), (352, 352), torch.float32)
    assert positive.tolist() == [[896, 512, 16, 32, diffusers_private.AESTHETIC_SCORE]]
    assert negative.tolist() == [[896, 512, 16, 32, diffusers_private.NEGATIVE_AESTHETIC_SCORE]]


@pytest.mark.parametrize("pipeline", ["img2img", "refiner"])
@pytest.mark.parametrize("start", [{"strength": 0.3}, {"strength": 1.0, "denoising_start": 0.8}],
                         ids=["from a strength", "from denoising_start"])
def test_queued_pipeline_setup_answers_what_diffusers_answers(models, pipeline, start):
    from sdxld.models import make_scheduler

    pipe = getattr(models, pipeline)
    pipe.scheduler = make_scheduler("UniPC", pipe.scheduler.config)
    answers = []
    for get_timesteps in (pipe.get_timesteps, lambda *a, **k: type(pipe).get_timesteps(pipe, *a, **k)):
        pipe.scheduler.set_timesteps(10, device="cpu")
        timesteps, steps = get_timesteps(10, start["strength"], "cpu", start.get("denoising_start"))
        answers.append((timesteps.tolist(), steps, pipe.scheduler.begin_index))
    shimmed, diffusers = answers
    assert shimmed == diffusers and diffusers[1] in (2, 3)
    arguments = ((896, 512), (16, 32), (352, 352), diffusers_private.AESTHETIC_SCORE, diffusers_private.NEGATIVE_AESTHETIC_SCORE,
                 (896, 512), (16, 32), (352, 352), torch.float32, pipe.text_encoder_2.config.projection_dim)
    assert [ids.tolist() for ids in pipe._get_add_time_ids(*arguments)] == \
        [ids.tolist() for ids in type(pipe)._get_add_time_ids(pipe, *arguments)]


def test_disable_offloading_says_which_offload_was_on_and_the_device_it_used(models):
    from diffusers import StableDiffusionXLPipeline

    from sdxld.tiny import ensure_tiny_model

    assert tuple(diffusers_private.disable_offloading(models.base)) == (False, False, False)
    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model()[0])
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.device(diffusers_private.offload_device(pipe)).type == "cpu"
    assert tuple(diffusers_private.disable_offloading(pipe)) == (True, False, False)


def test_reapplying_group_offloading_on_a_module_without_it_changes_nothing(models):
    before = {name: p.clone() for name, p in models.base.vae.named_parameters()}
    diffusers_private.reapply_group_offloading(models.base.vae)
    assert all(torch.equal(p, before[name]) for name, p in models.base.vae.named_parameters())


def test_the_offload_device_defaults_to_cuda_and_is_shared_from_the_base(models):
    assert diffusers_private.offload_device(models.refiner) == "cuda"  # never offloaded
    models.base._offload_device = torch.device("cpu")
    try:
        diffusers_private.share_offload_device(models.refiner, models.base)
        assert diffusers_private.offload_device(models.refiner) == torch.device("cpu")
    finally:
        del models.base._offload_device, models.refiner._offload_device


def test_own_parameters_are_told_from_those_of_submodules():
    assert diffusers_private.has_own_parameters(torch.nn.Linear(2, 2))
    assert not diffusers_private.has_own_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vectorized_tile_blending_gives_the_loops_values_bit_for_bit(models, dtype):
    import copy

    vae = copy.deepcopy(models.base.vae).to(dtype)
    vae.enable_tiling()
    assert vae.blend_v.__name__ == "_blend_rows" and vae.blend_h.__name__ == "_blend_columns"
    looped = copy.deepcopy(vae)
    del looped.blend_v, looped.blend_h  # the class's own Python loops again
    assert looped.blend_v.__func__ is type(vae).blend_v
    generator = torch.Generator().manual_seed(0)
    # 2x2 tiles of the tiny VAE (256-pixel tiles, 64 pixels of overlap): both seam directions.
    latent = torch.randn(1, 4, 40, 40, generator=generator).to(dtype)
    image = torch.rand(1, 3, 320, 320, generator=generator).to(dtype) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(latent).sample, looped.decode(latent).sample)
        assert torch.equal(vae.encode(image).latent_dist.mean, looped.encode(image).latent_dist.mean)
    for extent in (0, 5, 64, 1000):  # the overlap cut to the tensors' size, as the loop cuts it
        a, b = torch.randn(2, 1, 4, 30, 40, generator=generator).to(dtype)
        assert torch.equal(vae.blend_v(a, b.clone(), extent), looped.blend_v(a, b.clone(), extent))
        assert torch.equal(vae.blend_h(a, b.clone(), extent), looped.blend_h(a, b.clone(), extent))


def test_a_vae_without_the_blend_methods_keeps_its_own_code():
    class OtherVae(torch.nn.Module):
        pass

    vae = OtherVae()
    diffusers_private.vectorize_tile_blending(vae)
    assert not hasattr(vae, "blend_v") and not hasattr(vae, "blend_h")
