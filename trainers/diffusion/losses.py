"""Diffusion training objectives as pure functions on tensors (what diffusers' examples compute).

Denoising (DDPM, Ho et al. 2020): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the model predicts
eps ("epsilon") or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v_prediction", Salimans & Ho 2022).
Offset noise (Guttenberg 2023): eps += offset * n, n ~ N(0, I) of shape (B, C, 1, 1).
Min-SNR weighting (Hang et al. 2023, arXiv 2303.09556): snr = abar / (1 - abar);
w = min(snr, gamma) / snr for epsilon, min(snr, gamma) / (snr + 1) for v-prediction.
Prior preservation (DreamBooth, Ruiz et al. 2022): loss = mse(instance rows) + w * mse(class rows).
Flow matching (SD3/Flux, Esser et al. 2024): x_t = (1 - s) x0 + s eps, target eps - x0,
s = sigmoid(u), u ~ N(mean, std) ("logit-normal").
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def sample_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps ~ N(0, I) like `latents` (B, C, H, W), plus `offset` * N(0, 1) per (sample, channel)."""
    device = generator.device if generator is not None else latents.device  # draw where the generator lives
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=device)
    if offset:
        shift = torch.randn(latents.shape[:2], generator=generator, dtype=latents.dtype, device=device)
        noise = noise + offset * shift[:, :, None, None]  # (B, C, 1, 1) broadcast
    return noise.to(latents.device)


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, generator: torch.Generator | None = None, device: str = "cpu"
) -> torch.Tensor:
    """t ~ U{0 .. T-1}, shape (B,), int64."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator).to(device)


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (the DDPM forward process)."""
    abar = _per_sample(alphas_cumprod.to(x0.device)[t], x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def velocity(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    abar = _per_sample(alphas_cumprod.to(x0.device)[t], x0)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def target_for(
    prediction_type: str, alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the denoiser should output for this prediction type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(alphas_cumprod, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t), shape (B,)."""
    abar = alphas_cumprod.to(t.device)[t].float()
    return abar / (1 - abar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma, shape (B,)."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1)
    return clipped / snr_values


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, (B, ...) -> (B,), in fp32; `mask` (B, 1, H, W) weights pixels."""
    error = (prediction.float() - target.float()) ** 2
    if mask is not None:
        mask = mask.float().expand_as(error)
        return (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1.0)
    return error.flatten(1).mean(1)


def combine(
    losses: torch.Tensor,
    weights: torch.Tensor | None = None,
    is_class: torch.Tensor | None = None,
    prior_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean of per-sample losses (B,); class rows (prior preservation) count `prior_weight`.

    Returns the scalar loss and its parts for logging: {"instance": ..., "prior": ...}.
    """
    if weights is not None:
        losses = losses * weights
    if is_class is None or not bool(is_class.any()):
        return losses.mean(), {"instance": float(losses.detach().mean())}
    is_class = is_class.to(losses.device).bool()
    instance = losses[~is_class].mean() if bool((~is_class).any()) else losses.new_zeros(())
    prior = losses[is_class].mean()
    return instance + prior_weight * prior, {"instance": float(instance.detach()), "prior": float(prior.detach())}


def logit_normal_sigmas(
    batch_size: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """s = sigmoid(u), u ~ N(mean, std): flow-matching noise levels in (0, 1), shape (B,)."""
    return torch.sigmoid(mean + std * torch.randn((batch_size,), generator=generator))


def flow_match_inputs(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target): x_t = (1 - s) x0 + s eps, target = eps - x0 (rectified flow)."""
    s = _per_sample(sigmas.to(x0.device, x0.dtype), x0)
    return (1 - s) * x0 + s * noise, noise - x0


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast over `like`."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
