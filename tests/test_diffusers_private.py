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
