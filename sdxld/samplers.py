"""sdxld's own UniPC and Euler a: diffusers' samplers, with steps that never make the host wait
for the GPU.

A blocking copy to the GPU or a read of a GPU value waits until the GPU has run everything queued:
the host stops queuing ahead, and the next step starts with the card idle while the host catches
up (bench/scheduler_waits.py counts them per sampler; docs/performance.md).

UniPC: diffusers' UniPCMultistepScheduler keeps the noise schedule on the host, and each step
copies the sigmas it needs to the GPU (about 6 blocking copies a step at order 2) and solves its
small coefficient system there (`torch.linalg.solve` reads its error flag back). The coefficients
depend on the schedule only, never on the latents, so this subclass computes them on the host from
the same float32 sigmas with the same formulas and hands them to the GPU's kernels as scalars (a
0-dim CPU tensor in an op with GPU tensors is passed as a kernel argument, no copy), rounded to the
latents' dtype as diffusers' kernels round its device copies (`_like`): no waits, and the same
samples (bit for bit on the CPU; docs/performance.md on a GPU). The step's bookkeeping (orders,
warm-up, corrector, history) stays diffusers'.

Euler a: each step adds noise drawn from the image's generator, which sdxld keeps on the CPU (a seed
gives the same image on any card); diffusers copies that noise to the GPU with a blocking copy.
sdxld's draws the same numbers the same way, into pinned memory, and copies them without waiting.

Both: `set_timesteps` copies the new schedule's timesteps to the GPU with a blocking copy, which
in the refiner's pipeline call (stage 1's and stage 2's hand-off) made the host wait for the
base's steps to finish before queuing the refiner's. sdxld's copy is queued, and the timesteps
are kept on the host too for what reads them (diffusers_private.queue_pipeline_setup).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from diffusers import EulerAncestralDiscreteScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .host_waits import queued_copy


def _like(coefficient: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """A coefficient as diffusers' step applies it to `tensor`: its 0-dim GPU copy is loaded in the
    tensor's dtype by torch's GPU kernels (bf16: 8 bits), while a host scalar would be used at full
    float32 precision. Rounding it here keeps the samples diffusers' (the CPU's kernels round host
    scalars so too)."""
    return coefficient.to(tensor.dtype)


@dataclass
class _Coefficients:
    """One UniP or UniC update's scalars, all 0-dim float32 tensors on the host."""

    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    alpha_s0: torch.Tensor
    sigma_s0: torch.Tensor
    h_phi_1: torch.Tensor
    B_h: torch.Tensor
    rks: list[torch.Tensor]  # older outputs' log-SNR offsets, relative to this step's
    R: torch.Tensor  # the order-conditions system, R @ rhos = b
    b: torch.Tensor


class _TimestepsQueued:
    """set_timesteps as diffusers', the schedule made on the host; the timesteps then copied to
    `device` without waiting, and kept on the host (timesteps_on_host() says whether they still
    are the scheduler's). Its signature stays diffusers' (wraps): diffusers' pipelines read it to
    know whether custom timesteps or sigmas are taken."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        diffusers_set_timesteps = super(_TimestepsQueued, cls).set_timesteps

        @functools.wraps(diffusers_set_timesteps)
        def set_timesteps(self, num_inference_steps=None, device=None, *args, **kwargs):
            diffusers_set_timesteps(self, num_inference_steps, None, *args, **kwargs)
            self._timesteps_on_host = self.timesteps
            if device is not None:
                self.timesteps = queued_copy(self.timesteps, device)
            self._timesteps_queued = self.timesteps

        cls.set_timesteps = set_timesteps


def timesteps_on_host(scheduler) -> torch.Tensor | None:
    """The scheduler's timesteps as a host tensor, if it kept them since its last set_timesteps
    (a scheduler of diffusers' own, or timesteps set another way: None)."""
    queued = getattr(scheduler, "_timesteps_queued", None)
    if queued is None or queued is not scheduler.timesteps:
        return None
    return scheduler._timesteps_on_host


class NoWaitUniPCScheduler(_TimestepsQueued, UniPCMultistepScheduler):
    """diffusers' UniPC (B(h) variants, data or noise prediction, any order), with its scalars kept
    on the host; `solver_p` (another scheduler as the predictor) is left to diffusers."""

    def _coefficients(self, t: int, s0: int, older: list[int], order: int) -> _Coefficients:
        """For the update from schedule index `s0` to `t`, using the outputs made at `older`."""

        def log_snr(index: int):
            alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
            return alpha, sigma, torch.log(alpha) - torch.log(sigma)

        alpha_t, sigma_t, lambda_t = log_snr(t)
        alpha_s0, sigma_s0, lambda_s0 = log_snr(s0)
        h = lambda_t - lambda_s0
        rks = [(log_snr(index)[2] - lambda_s0) / h for index in older] + [torch.ones(())]

        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h * phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        if self.config.solver_type == "bh1":
            B_h = hh
        elif self.config.solver_type == "bh2":
            B_h = torch.expm1(hh)
        else:
            raise NotImplementedError(f"UniPC solver_type {self.config.solver_type!r}")

        powers, b, factorial = [], [], 1
        stacked_rks = torch.stack(rks)
        for i in range(1, order + 1):
            powers.append(torch.pow(stacked_rks, i - 1))
            b.append(h_phi_k * factorial / B_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return _Coefficients(alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h, rks[:-1],
                             torch.stack(powers), torch.stack(b))

    def _base_update(self, c: _Coefficients, x: torch.Tensor, m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-order part of the update, and the factor its higher-order correction takes."""
        if self.predict_x0:
            decay, scale = c.sigma_t / c.sigma_s0, c.alpha_t
        else:
            decay, scale = c.alpha_t / c.alpha_s0, c.sigma_t
        return _like(decay, x) * x - _like(scale * c.h_phi_1, m0) * m0, _like(scale * c.B_h, x)

    def _older_differences(self, m0: torch.Tensor, rks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The older outputs' differences from the newest, each over its log-SNR offset."""
        return [(self.model_outputs[-(i + 2)] - m0) / _like(rk, m0) for i, rk in enumerate(rks)]

    @staticmethod
    def _weighted_sum(rhos: torch.Tensor, differences: list[torch.Tensor]):
        # rhos in the latents' dtype, as diffusers rounds them before its einsum.
        return sum(rho * difference for rho, difference in zip(rhos.unbind(), differences))

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        if self.solver_p or args or sample is None or order is None:
            return super().multistep_uni_p_bh_update(model_output, *args, sample=sample, order=order, **kwargs)
        m0, k = self.model_outputs[-1], self.step_index
        c = self._coefficients(k + 1, k, [k - i for i in range(1, order)], order)
        x_t, factor = self._base_update(c, sample, m0)
        if order > 1:
            differences = self._older_differences(m0, c.rks)
            if order == 2:
                rhos = torch.full((1,), 0.5, dtype=sample.dtype)
            else:
                rhos = torch.linalg.solve(c.R[:-1, :-1], c.b[:-1]).to(sample.dtype)
            x_t = x_t - factor * self._weighted_sum(rhos, differences)
        return x_t.to(sample.dtype)

    def multistep_uni_c_bh_update(self, this_model_output, *args, last_sample=None, this_sample=None, order=None,
                                  **kwargs):
        if args or last_sample is None or this_sample is None or order is None:
            return super().multistep_uni_c_bh_update(this_model_output, *args, last_sample=last_sample,
                                                     this_sample=this_sample, order=order, **kwargs)
        m0, k = self.model_outputs[-1], self.step_index  # corrects the step from k - 1 to k
        c = self._coefficients(k, k - 1, [k - 1 - i for i in range(1, order)], order)
        x_t, factor = self._base_update(c, last_sample, m0)
        differences = self._older_differences(m0, c.rks) + [this_model_output - m0]
        if order == 1:
            rhos = torch.full((1,), 0.5, dtype=last_sample.dtype)
        else:
            rhos = torch.linalg.solve(c.R, c.b).to(last_sample.dtype)
        x_t = x_t - factor * self._weighted_sum(rhos, differences)
        return x_t.to(last_sample.dtype)


def noise_without_wait(like: torch.Tensor, generator) -> torch.Tensor:
    """Noise shaped like `like`, the numbers diffusers' `randn_tensor` draws from `generator` (one,
    or one per image), on `like`'s device, copied there without making the host wait."""
    first = generator[0] if isinstance(generator, list) else generator
    if first is None or first.device.type != "cpu" or like.device.type == "cpu":
        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    return queued_copy(randn_tensor(like.shape, generator=generator, device=torch.device("cpu"), dtype=like.dtype),
                       like.device)


class NoWaitEulerAncestralScheduler(_TimestepsQueued, EulerAncestralDiscreteScheduler):
    """diffusers' Euler a step (epsilon or v prediction), its noise from `noise_without_wait`."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        prediction = self.config.prediction_type
        if prediction not in ("epsilon", "v_prediction") or isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            # diffusers' own errors for what it refuses (the same test as its step's)
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)  # as diffusers: the update in float32
        if prediction == "epsilon":
            denoised = sample - sigma * model_output
        else:
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - denoised) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        prev_sample = prev_sample + noise_without_wait(model_output, generator) * sigma_up
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
