"""One flow-matching training step for DiT families (SD3, Flux): batch -> per-sample losses.

Rectified flow (Esser et al. 2024, arXiv 2403.03206, the SD3 paper), as diffusers'
train_dreambooth_lora_sd3.py / _flux.py compute it:

    u ~ density(weighting_scheme): logit_normal sigmoid(N(mean, std)); mode 1 - u - s (cos^2(pi u / 2) - 1 + u);
                                   otherwise U(0, 1)
    i = floor(u * N); t = timesteps[i]; sigma = sigmas[i]: the tables of the model's FlowMatchEulerDiscreteScheduler
                                   (its `shift` applied there; none when it shifts dynamically, as Flux's)
    x_t = (1 - sigma) x0 + sigma eps;  target = eps - x0
    preconditioned (SD3's default): x0_hat = -sigma * prediction + x_t, compared with x0
    weight(sigma): sigma_sqrt 1 / sigma^2; cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)); otherwise 1
    loss = mean over samples of weight * mean((prediction - target)^2)

The family description packs latents, scales the timestep and adds guidance (`FamilyDescription.predict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from personalize.models.families import FamilyDescription
from personalize.trainers.diffusion import losses

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass
class FlowSchedule:
    timesteps: torch.Tensor  # (N,) descending, in (0, N]
    sigmas: torch.Tensor  # (N,) matching noise levels in (0, 1]
    num_train_timesteps: int


@dataclass
class FlowSettings:
    weighting_scheme: str
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    guidance_scale: float | None = None


def flow_schedule(scheduler_config: Any) -> FlowSchedule:
    """The training tables of a pipeline's FlowMatchEulerDiscreteScheduler (as constructed, before set_timesteps).

    A pipeline released with another flow scheduler (Wan's UniPC on flow sigmas) names its shift
    `flow_shift`: the training tables take that shift.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(scheduler_config)
    if "shift" not in config and config.get("flow_shift") is not None:
        config["shift"] = config["flow_shift"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    count = scheduler.config.num_train_timesteps
    return FlowSchedule(scheduler.timesteps.float().clone(), scheduler.sigmas[:count].float().clone(), count)


def timestep_density(
    scheme: str,
    batch_size: int,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """u in [0, 1), shape (B,): where on the schedule each sample's noise level is drawn."""
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn((batch_size,), generator=generator))
    u = torch.rand((batch_size,), generator=generator)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (B,) for noise levels sigmas (B,)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def sample_sigmas(schedule: FlowSchedule, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (B,), sigmas (B,)) at the schedule positions floor(u * N)."""
    indices = (u * schedule.num_train_timesteps).long().clamp(0, schedule.num_train_timesteps - 1)
    return schedule.timesteps[indices], schedule.sigmas[indices]


def per_sample_loss(
    family: FamilyDescription,
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    embeds: dict[str, torch.Tensor],
    schedule: FlowSchedule,
    settings: FlowSettings,
    generator: torch.Generator,
    compute_dtype: torch.dtype,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), weights (B,)) for scaled latents x0 (B, C, h, w) -- video: (B, C, F, h, w) -- in fp32;
    `reference` (B, C, h', w'):
    an edit pair's source latents, fed clean to the family's `predict_edit`."""
    noise = losses.sample_noise(latents, 0.0, generator)  # (B, C, h, w)
    u = timestep_density(
        settings.weighting_scheme,
        latents.shape[0],
        generator,
        settings.logit_mean,
        settings.logit_std,
        settings.mode_scale,
    )
    timesteps, sigmas = sample_sigmas(schedule, u)
    noisy, target = losses.flow_match_inputs(latents, noise, sigmas)  # (B, C, h, w) each
    inputs = {key: value.to(latents.device, compute_dtype) for key, value in embeds.items()}
    if reference is None:
        prediction = family.predict(
            transformer, noisy.to(compute_dtype), timesteps.to(latents.device), inputs, settings.guidance_scale
        )  # (B, C, h, w)
    else:
        assert family.predict_edit is not None  # the recipe checked the family before training
        prediction = family.predict_edit(
            transformer,
            noisy.to(compute_dtype),
            timesteps.to(latents.device),
            inputs,
            settings.guidance_scale,
            reference.to(latents.device, compute_dtype),
        )  # (B, C, h, w)
    if settings.precondition_outputs:  # x0_hat = x_t - sigma * v_hat, compared with x0
        sigma = sigmas.to(latents.device).reshape(-1, *([1] * (latents.ndim - 1)))
        prediction, target = noisy - sigma * prediction.float(), latents
    per_sample = losses.per_sample_mse(prediction, target)
    return per_sample, loss_weighting(settings.weighting_scheme, sigmas).to(per_sample.device)
