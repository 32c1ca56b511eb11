"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv 2302.05543): a trainable copy of the UNet encoder.

The copy (diffusers `ControlNetModel.from_unet`) reads z_t plus a conditioning image through a small
conv embedding; its per-resolution outputs pass zero-initialized 1x1 convolutions and are added to the
frozen UNet's skip connections and middle block, so at step 0 the base is unchanged:

    down, mid = controlnet(z_t, t, text, cond);  eps = unet(z_t, t, text, down + skips, mid + middle)

Optionally a core adapter (`conditioning.controlnet_adapter`, e.g. lora) trains on the copy instead of
all its weights (zero convolutions and conditioning embedding still train fully); it is merged before
saving. Output: the ControlNetModel folder (config.json + safetensors) at the run's output dir.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError

ADAPTER_NAME = "controlnet"
# conditioning embedding channels of diffusers' ControlNet; each entry after the first halves the size
EMBEDDING_CHANNELS = (16, 32, 96, 256)
ALWAYS_TRAINED = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent side: 2 ** (number of VAE blocks - 1) (8 for SD, 2 for the tiny test models)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def embedding_channels(scale_factor: int) -> tuple[int, ...]:
    """Conditioning-embedding channels whose strided convs bring pixels down to the latent size."""
    halvings = int(round(math.log2(scale_factor)))
    if 2**halvings != scale_factor or halvings + 1 > len(EMBEDDING_CHANNELS):
        raise UserError(f"the VAE downsamples by {scale_factor}; ControlNet training needs 2, 4 or 8")
    return EMBEDDING_CHANNELS[: halvings + 1]


def pair(images: Any, conditioning: Any) -> Any:
    from personalize.data.paired import build_paired

    return build_paired(images, conditioning.folder, conditioning.annotator)


def build(pipe: Any, family: str, config: Any) -> dict[str, torch.nn.Module]:
    from diffusers import ControlNetModel

    channels = embedding_channels(vae_scale_factor(pipe.vae))
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels).float()
    method = config.conditioning.controlnet_adapter
    if not method:
        controlnet.requires_grad_(True)
        return {"controlnet": controlnet}
    from personalize import adapters

    controlnet.requires_grad_(False)
    hyper: dict[str, Any] = dict(config.method_options)
    if method in ("lora", "locon", "dora", "loha", "lokr"):
        hyper.update(rank=config.rank or 16, alpha=config.alpha or float(config.rank or 16))
    adapters.inject(controlnet, method, targets=config.targets or "attention", name=ADAPTER_NAME, **hyper)
    for name in ALWAYS_TRAINED:
        getattr(controlnet, name).requires_grad_(True)
    return {"controlnet": controlnet}


def predict(
    unet: Any,
    models: dict[str, Any],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    kwargs: dict[str, Any],
    batch: dict[str, Any],
    config: Any,
    generator: torch.Generator,
) -> torch.Tensor:
    """The UNet's prediction (B, C, h, w) with the ControlNet residuals added."""
    controlnet = models["controlnet"]
    cond = batch["conditioning"].to(noisy.device)  # (B, 3, H, W) in [0, 1]
    down, mid = controlnet(
        noisy.float(),
        timesteps,
        encoder_hidden_states=kwargs["encoder_hidden_states"].float(),
        controlnet_cond=cond,
        added_cond_kwargs={key: value.float() for key, value in kwargs.get("added_cond_kwargs", {}).items()},
        return_dict=False,
    )
    dtype = noisy.dtype
    return unet(
        noisy,
        timesteps,
        **kwargs,
        down_block_additional_residuals=[residual.to(dtype) for residual in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
    )[0]


def save(models: dict[str, Any], pipe: Any, family: str, output: Path, config: Any) -> list[Path]:
    controlnet = models["controlnet"]
    if config.conditioning.controlnet_adapter:
        from personalize import adapters

        controlnet = copy.deepcopy(controlnet)  # folded in a copy, so that training can go on after a sample
        adapters.merge(controlnet, ADAPTER_NAME)
        adapters.remove(controlnet, ADAPTER_NAME)  # merge + remove: plain weights a stock loader reads
    controlnet.save_pretrained(str(output), safe_serialization=True)
    return [output / "config.json", output / "diffusion_pytorch_model.safetensors"]


def restore(pipe: Any, side: dict[str, Any]) -> None:
    """The base UNet was never modified (the ControlNet is a copy)."""


def reinstall(pipe: Any, side: dict[str, Any]) -> None:
    """Nothing to put back after a mid-run sample: the ControlNet lives beside the UNet."""
