"""T2I-Adapter (Mou et al. 2023, arXiv 2302.08453): a small conv network from the conditioning image to
one feature map per UNet down block, added inside the frozen UNet's encoder:

    features = adapter(cond);  eps = unet(z_t, t, text, down_intrablock_additional_residuals=features)

The UNet adds feature i to down block i: inside a cross-attention block before its downsampler, after a
plain block's downsampler. That fixes the resolution of each feature, and so which diffusers layout fits:
`full_adapter` / `light_adapter` (one halving per block: SD1.x/2.x) or `full_adapter_xl` (no halving
between the first two features: SDXL). Timesteps are sampled cubically (t = (1 - u^3) T), as the
authors' SDXL training does, since structure is decided in the early (noisy) steps.
Output: the T2IAdapter folder (config.json + safetensors) at the run's output dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError
from personalize.trainers.conditioning.controlnet import vae_scale_factor

TIMESTEPS = "cubic"


def feature_levels(unet_config: Any) -> list[int]:
    """Per down block, how many times the latent is halved where the UNet adds the adapter's feature."""
    blocks = list(unet_config.down_block_types)
    levels = []
    for index, block in enumerate(blocks):
        before_own_downsampler = "CrossAttn" in block or index == len(blocks) - 1
        levels.append(index if before_own_downsampler else index + 1)
    return levels


def adapter_layout(unet_config: Any, vae_factor: int, variant: str = "full") -> dict[str, Any]:
    """T2IAdapter(**layout) whose features match the UNet's down blocks (resolution and channels)."""
    levels = feature_levels(unet_config)
    channels = list(unet_config.block_out_channels)
    first = levels[0]
    downscale = vae_factor * 2**first  # pixels -> the first feature's size
    one_halving_each = [first + index for index in range(len(levels))]
    xl_pattern = [first + (1 if index >= 2 else 0) for index in range(len(levels))]  # FullAdapterXL halves once
    if levels == one_halving_each:
        if variant == "light":
            if len(channels) < 2 or channels[-1] != channels[-2]:
                raise UserError("the light T2I-Adapter needs equal channels in the last two UNet blocks (SD1.x)")
            return dict(
                adapter_type="light_adapter", channels=channels[:-1], num_res_blocks=4, downscale_factor=downscale
            )
        return dict(adapter_type="full_adapter", channels=channels, num_res_blocks=2, downscale_factor=downscale)
    if levels == xl_pattern:
        if variant == "light":
            raise UserError("diffusers has no light T2I-Adapter for SDXL-style UNets; use t2i_variant: full")
        if len(levels) >= 3:  # SDXL: a fourth feature goes to the mid block (same size as the last down block)
            channels.append(channels[-1])
        return dict(adapter_type="full_adapter_xl", channels=channels, num_res_blocks=2, downscale_factor=downscale)
    raise UserError(f"no diffusers T2I-Adapter layout fits this UNet (feature levels {levels})")


def pair(images: Any, conditioning: Any) -> Any:
    from personalize.data.paired import build_paired

    return build_paired(images, conditioning.folder, conditioning.annotator)


def build(pipe: Any, family: str, config: Any) -> dict[str, torch.nn.Module]:
    from diffusers import T2IAdapter

    layout = adapter_layout(pipe.unet.config, vae_scale_factor(pipe.vae), config.conditioning.t2i_variant)
    torch.manual_seed(config.seed)
    adapter = T2IAdapter(in_channels=3, **layout).float()
    adapter.requires_grad_(True)
    return {"adapter": adapter}


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
    """The UNet's prediction (B, C, h, w) with the adapter's features added to its down blocks."""
    cond = batch["conditioning"].to(noisy.device)  # (B, 3, H, W) in [0, 1]
    features = models["adapter"](cond)  # [(B, C_i, h_i, w_i)] per down block
    residuals = [feature.to(noisy.dtype) for feature in features]
    return unet(noisy, timesteps, **kwargs, down_intrablock_additional_residuals=residuals, return_dict=False)[0]


def save(models: dict[str, Any], pipe: Any, family: str, output: Path, config: Any) -> list[Path]:
    models["adapter"].save_pretrained(str(output), safe_serialization=True)
    return [output / "config.json", output / "diffusion_pytorch_model.safetensors"]


def restore(pipe: Any, side: dict[str, Any]) -> None:
    """The base UNet was never modified."""


def reinstall(pipe: Any, side: dict[str, Any]) -> None:
    """Nothing to put back after a mid-run sample: the adapter lives beside the UNet."""
