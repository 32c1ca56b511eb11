"""One denoising training step for UNet models (SD1.x, SD2.x, SDXL): batch -> per-sample losses.

z_t = add_noise(z_0, eps, t); the UNet predicts from (z_t, t, text embeddings [, SDXL pooled
embeddings and time ids]); the loss is the MSE to the prediction target (losses.py), optionally
Min-SNR weighted. SDXL's micro-conditioning (Podell et al. 2023, section 2.2) passes
time_ids = (original h, w, crop top, left, target h, w) per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from personalize.trainers.diffusion import losses

TEXT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # (T,)
    num_train_timesteps: int
    prediction_type: str


def noise_schedule(scheduler_config: Any) -> NoiseSchedule:
    """The DDPM training schedule of a pipeline (its inference scheduler's betas and prediction type)."""
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(scheduler_config)
    return NoiseSchedule(ddpm.alphas_cumprod.clone(), ddpm.config.num_train_timesteps, ddpm.config.prediction_type)


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """(B, 2) x 3 -> (B, 6): what StableDiffusionXLPipeline._get_add_time_ids builds per image."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1)


def unet_conditioning(
    family: str, embeds: dict[str, torch.Tensor], batch: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Keyword arguments of UNet2DConditionModel.forward besides the sample and timestep."""
    kwargs: dict[str, Any] = {"encoder_hidden_states": embeds["prompt_embeds"].to(device)}
    if family == "sdxl":
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
        kwargs["added_cond_kwargs"] = {
            "text_embeds": embeds["pooled_prompt_embeds"].to(device),
            "time_ids": time_ids.to(device=device, dtype=embeds["prompt_embeds"].dtype),
        }
    return kwargs


def per_sample_loss(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    conditioning: dict[str, Any],
    schedule: NoiseSchedule,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    snr_gamma: float = 0.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(losses (B,), Min-SNR weights (B,) or None) for latents (B, C, h, w)."""
    batch_size = latents.shape[0]
    noise = losses.sample_noise(latents, noise_offset, generator)  # (B, C, h, w)
    timesteps = losses.sample_timesteps(batch_size, schedule.num_train_timesteps, generator).to(latents.device)
    noisy = losses.add_noise(schedule.alphas_cumprod, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **conditioning, return_dict=False)[0]  # (B, C, h, w)
    target = losses.target_for(schedule.prediction_type, schedule.alphas_cumprod, latents, noise, timesteps)
    if mask is not None:
        mask = F.interpolate(mask.float(), size=latents.shape[-2:], mode="area").to(latents.device)  # (B, 1, h, w)
    per_sample = losses.per_sample_mse(prediction, target, mask)
    weights = None
    if snr_gamma > 0:
        snr_values = losses.snr(schedule.alphas_cumprod, timesteps)
        weights = losses.min_snr_weights(snr_values, snr_gamma, schedule.prediction_type).to(per_sample.device)
    return per_sample, weights


def concat_batches(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge batches whose tensors have equal trailing shapes (one UNet call); others stay apart."""
    groups: list[dict[str, Any]] = []
    for batch in batches:
        shape_key = {key: tuple(value.shape[1:]) for key, value in batch.items() if torch.is_tensor(value)}
        for group in groups:
            if group["_shapes"] == shape_key and set(group) - {"_shapes"} == set(batch):
                for key, value in batch.items():
                    group[key] = torch.cat([group[key], value]) if torch.is_tensor(value) else group[key] + value
                break
        else:
            groups.append({**batch, "_shapes": shape_key})
    return [{key: value for key, value in group.items() if key != "_shapes"} for group in groups]
