"""sdxld's UniPC and Euler a: diffusers' samples, with no step ever waiting for the GPU."""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from sdxld.host_waits import waits_per_step
from sdxld.models import make_scheduler
from sdxld.tiny import sdxl_scheduler
from sdxld.samplers import NoWaitEulerAncestralScheduler, NoWaitUniPCScheduler, noise_without_wait

VARIANTS = {
    "SDXL's default (order 2, bh2, data prediction)": {},
    "order 3": {"solver_order": 3},
    "bh1": {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},  # to sigma 0: the last test
    # These two fail in diffusers down to sigma 0 (NaN; a singular system), so stop at the last sigma.
    "noise prediction": {"predict_x0": False, "final_sigmas_type": "sigma_min"},
    "v-prediction model": {"prediction_type": "v_prediction"},
    "Karras sigmas": {"use_karras_sigmas": True},
    "no lower order at the end": {"lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "corrector off for the first steps": {"disable_corrector": [0, 1, 2]},
    "flow sigmas": {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
}


def fake_unet(sample: torch.Tensor, t) -> torch.Tensor:
    """A fixed, nonlinear function of the sample and the timestep: the sampler's history matters."""
    weights = torch.linspace(-1.0, 1.0, sample.shape[1], dtype=torch.float32, device=sample.device).view(1, -1, 1, 1)
    return (torch.tanh(sample.float() * weights + t / 1000) - 0.1 * sample.float()).to(sample.dtype)


def sample_with(scheduler, steps: int, dtype=torch.float32, begin_at: int | None = None, seeds=None,
                device: str = "cpu", during_steps=contextlib.nullcontext) -> torch.Tensor:
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    if begin_at is not None:  # img2img: start part-way, as the pipelines do
        timesteps = timesteps[begin_at:]
        scheduler.set_begin_index(begin_at)
    elif device != "cpu":
        scheduler.set_begin_index(0)  # as SDXL's pipelines do; unset, the first step looks it up (a wait)
    latents = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    # As sdxld passes them to a sampler that draws noise: a CPU generator per image.
    extra = {}
    if seeds is not None:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        latents = latents[: len(seeds)]
        extra["generator"] = generators if len(generators) > 1 else generators[0]
    with during_steps():
        for t in timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(fake_unet(model_input, t), t, latents, return_dict=False, **extra)[0]
    return latents


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_variant_samples_what_diffusers_unipc_samples(options):
    config = sdxl_scheduler().config
    ours = sample_with(NoWaitUniPCScheduler.from_config(config, **options), 30)
    theirs = sample_with(UniPCMultistepScheduler.from_config(config, **options), 30)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_sdxls_default_is_bit_for_bit_on_the_cpu():
    # Same float32 scalars, same formulas: the images in old records come out again exactly.
    config = sdxl_scheduler().config
    assert torch.equal(sample_with(NoWaitUniPCScheduler.from_config(config), 30),
                       sample_with(UniPCMultistepScheduler.from_config(config), 30))


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_short_schedules_and_img2img_starts_sample_the_same(steps):
    config = sdxl_scheduler().config
    torch.testing.assert_close(sample_with(NoWaitUniPCScheduler.from_config(config), steps),
                               sample_with(UniPCMultistepScheduler.from_config(config), steps), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample_with(NoWaitUniPCScheduler.from_config(config), 20, begin_at=12),
                               sample_with(UniPCMultistepScheduler.from_config(config), 20, begin_at=12),
                               rtol=1e-5, atol=1e-5)


def test_half_precision_latents_sample_the_same_and_keep_their_dtype():
    config = sdxl_scheduler().config
    ours = sample_with(NoWaitUniPCScheduler.from_config(config), 30, dtype=torch.bfloat16)
    theirs = sample_with(UniPCMultistepScheduler.from_config(config), 30, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("ours, theirs, options", [
    (NoWaitUniPCScheduler, UniPCMultistepScheduler, {}),
    (NoWaitUniPCScheduler, UniPCMultistepScheduler, {"solver_order": 3}),
    (NoWaitEulerAncestralScheduler, EulerAncestralDiscreteScheduler, {}),
], ids=["UniPC", "UniPC order 3", "Euler a"])
def test_no_step_waits_for_the_device_where_diffusers_waits_every_step(ours, theirs, options):
    config = sdxl_scheduler().config
    assert sum(waits_per_step(theirs.from_config(config, **options)).values()) >= 1
    assert waits_per_step(ours.from_config(config, **options)) == Counter()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seeds", [(5,), (5, 6)], ids=["one image", "a batch of 2"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_a_samples_what_diffusers_euler_a_samples_bit_for_bit(prediction, seeds, dtype):
    config = sdxl_scheduler().config
    ours = sample_with(NoWaitEulerAncestralScheduler.from_config(config, prediction_type=prediction), 30, dtype, seeds=seeds)
    theirs = sample_with(EulerAncestralDiscreteScheduler.from_config(config, prediction_type=prediction), 30, dtype,
                         seeds=seeds)
    assert ours.dtype == dtype and ours.abs().max() > 0.1
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, sample_with(NoWaitEulerAncestralScheduler.from_config(config, prediction_type=prediction),
                                             30, dtype, seeds=[seed + 1 for seed in seeds]))


@pytest.mark.parametrize("timestep_as, prediction", [
    (int, "epsilon"),  # an index from enumerate(timesteps), not a timestep
    (lambda t: t.long(), "epsilon"),
    (lambda t: t, "sample"),  # a prediction type Euler a has no formula for
], ids=["int", "integer tensor", "sample prediction"])
def test_euler_a_refuses_what_diffusers_refuses_with_its_error(timestep_as, prediction):
    def error(scheduler_class):
        scheduler = scheduler_class.from_config(sdxl_scheduler().config, prediction_type=prediction)
        scheduler.set_timesteps(4)
        sample = torch.zeros(1, 4, 8, 8)
        with pytest.raises((ValueError, NotImplementedError)) as raised:
            scheduler.step(sample, timestep_as(scheduler.timesteps[0]), sample, generator=torch.Generator().manual_seed(0))
        return type(raised.value), str(raised.value)

    assert error(NoWaitEulerAncestralScheduler) == error(EulerAncestralDiscreteScheduler)


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU; this machine has none")


@ON_CUDA
@pytest.mark.parametrize("ours, theirs, seeds, same_bits", [
    # UniPC: host scalars rounded as diffusers' kernels round its device ones; the last float32 bit
    # of a coefficient may still differ (docs/performance.md). Euler a runs the same kernels.
    (NoWaitUniPCScheduler, UniPCMultistepScheduler, None, False),
    (NoWaitEulerAncestralScheduler, EulerAncestralDiscreteScheduler, (5, 6), True),
], ids=["UniPC", "Euler a"])
def test_on_cuda_no_step_synchronizes_and_the_samples_are_diffusers(ours, theirs, seeds, same_bits):
    config = sdxl_scheduler().config

    @contextlib.contextmanager
    def no_synchronizing():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # torch raises at any synchronizing CUDA call
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def sample(scheduler_class, dtype=torch.float32, during_steps=contextlib.nullcontext):
        return sample_with(scheduler_class.from_config(config), 30, dtype, seeds=seeds, device="cuda",
                           during_steps=during_steps)

    ours_fp32 = sample(ours, during_steps=no_synchronizing)
    ours_bf16 = sample(ours, torch.bfloat16, during_steps=no_synchronizing)
    with pytest.raises(RuntimeError, match="synchroniz"):
        sample(theirs, during_steps=no_synchronizing)
    theirs_fp32, theirs_bf16 = sample(theirs), sample(theirs, torch.bfloat16)
    if same_bits:
        assert torch.equal(ours_fp32, theirs_fp32) and torch.equal(ours_bf16, theirs_bf16)
    torch.testing.assert_close(ours_fp32, theirs_fp32, rtol=1e-5, atol=1e-5)
    # Coefficients used unrounded change most bf16 values (83 % in this model, up to 2.0).
    assert (ours_bf16 != theirs_bf16).float().mean() < 0.05
    torch.testing.assert_close(ours_bf16.float(), theirs_bf16.float(), rtol=0.02, atol=0.02)


def test_noise_for_the_device_is_the_generators_next_numbers_as_diffusers_draws_them():
    device_latents = torch.empty(2, 4, 12, 10, device="meta", dtype=torch.bfloat16)
    ours = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    theirs = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    noise = noise_without_wait(device_latents, ours)
    assert noise.device.type == "meta" and noise.shape == device_latents.shape and noise.dtype == torch.bfloat16
    randn_tensor(device_latents.shape, generator=theirs, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs))


def test_bh1_down_to_zero_noise_ends_on_an_image_where_diffusers_ends_on_nan():
    # The last step's B(h) is infinite there; diffusers multiplies it by a correction of 0.
    config = sdxl_scheduler().config
    theirs = sample_with(UniPCMultistepScheduler.from_config(config, solver_type="bh1"), 30)
    ours = sample_with(NoWaitUniPCScheduler.from_config(config, solver_type="bh1"), 30)
    assert theirs.isnan().all() and ours.isfinite().all()
    with_final_sigma = sample_with(NoWaitUniPCScheduler.from_config(config, solver_type="bh1", final_sigmas_type="sigma_min"), 30)
    assert (ours - with_final_sigma).abs().max() < 0.05 * ours.abs().max()


@pytest.mark.parametrize("sampler, ours, theirs", [("UniPC", NoWaitUniPCScheduler, UniPCMultistepScheduler),
                                                   ("Euler a", NoWaitEulerAncestralScheduler, EulerAncestralDiscreteScheduler)])
def test_the_unipc_and_euler_a_samplers_are_sdxlds_own(sampler, ours, theirs):
    scheduler = make_scheduler(sampler, sdxl_scheduler().config)
    assert type(scheduler) is ours and isinstance(scheduler, theirs)


@pytest.mark.parametrize("ours, theirs", [(NoWaitUniPCScheduler, UniPCMultistepScheduler),
                                          (NoWaitEulerAncestralScheduler, EulerAncestralDiscreteScheduler)],
                         ids=["UniPC", "Euler a"])
def test_a_new_schedule_reaches_the_device_without_waiting_and_holds_diffusers_values(ours, theirs):
    from sdxld.host_waits import CountHostWaits
    from sdxld.samplers import timesteps_on_host

    config = sdxl_scheduler().config
    expected = theirs.from_config(config)
    expected.set_timesteps(12, device="cpu")
    scheduler = ours.from_config(config)
    with CountHostWaits() as waits:
        scheduler.set_timesteps(12, device="meta")  # meta stands in for the card
    assert not waits.counts, f"the host waited for the card: {dict(waits.counts)}"
    assert scheduler.timesteps.device.type == "meta" and scheduler.timesteps.dtype == expected.timesteps.dtype
    assert torch.equal(timesteps_on_host(scheduler), expected.timesteps)
    assert torch.equal(scheduler.sigmas, expected.sigmas) and scheduler.sigmas.device.type == "cpu"
    # diffusers' pipelines read the signature to know whether custom timesteps or sigmas are taken.
    assert inspect.signature(scheduler.set_timesteps) == inspect.signature(expected.set_timesteps)
    scheduler.timesteps = scheduler.timesteps[2:]  # set another way: the host copy no longer speaks for them
    assert timesteps_on_host(scheduler) is None
