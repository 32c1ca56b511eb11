"""Frozen encoders of a diffusion pipeline as plain functions: prompts -> embeddings, pixels -> latents.

`encode_text` returns exactly what the stock pipeline's `encode_prompt` gives without classifier-free
guidance, as a dict of batched tensors:

- sd1 / sd2: {"prompt_embeds": (B, 77, D)} -- the text encoder's last hidden state.
- sdxl: {"prompt_embeds": (B, 77, D1 + D2), "pooled_prompt_embeds": (B, P)} -- both encoders'
  penultimate hidden states concatenated, the pooled projection of the second.
- sd3: {"prompt_embeds": (B, 77 + T5 len, 4096), "pooled_prompt_embeds": (B, P1 + P2)}.
- flux: {"prompt_embeds": (B, T5 len, D), "pooled_prompt_embeds": (B, P)}; Flux's `text_ids` are
  zeros (T5 len, 3) and are rebuilt by the caller.

Gradients flow through sd1/sd2/sdxl text encoders (for text-encoder training); sd3/flux call the
pipeline itself. Tensors come back on the text encoder's device and dtype.

`encode_images` maps pixels in [-1, 1] to the latent space the denoiser trains in:
z = (E(x) - shift_factor) * scaling_factor (shift only for VAEs that define it: SD3, Flux), or, for
VAEs that normalise each latent channel (their config has latents_mean / latents_std: Qwen-Image, Krea 2,
Wan), z_c = (E(x)_c - mean_c) / std_c. Video-style VAEs (a `temperal_downsample` config: Qwen-Image's,
Wan's) take clips (B, 3, F, H, W) and give (B, C, F', h, w); an image (B, 3, H, W) goes in as one frame.
A VAE with latent batch-norm statistics (Flux.2's AutoencoderKLFlux2) has its own latent space: E(x) in 2x2
patches (B, 4C, H/16, W/16), normalized per channel, z = (patches - running_mean) / sqrt(running_var + eps).
By default it takes the *mean* of the VAE posterior instead of a sample: a cached latent is then a
pure function of the image (reproducible, shareable across runs), and the posterior's standard
deviation is small next to the noise the diffusion loss adds (the SD VAE's is about 1e-3 to 1e-2 of
the latent scale), so training on the mean loses nothing measurable. `sample=True` draws instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from personalize.models.family import detect_family


def _tokens(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # (B, 77)


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def _clip_last_hidden(tokenizer: Any, encoder: Any, prompts: list[str]) -> torch.Tensor:
    device, dtype = _device_dtype(encoder)
    inputs = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(device)
    hidden = encoder(inputs.input_ids.to(device), attention_mask=mask)[0]  # (B, 77, D)
    return hidden.to(dtype)


def _sdxl(pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    hidden_states, pooled = [], None
    for tokenizer, encoder in pairs:
        if tokenizer is None or encoder is None:
            continue
        device, _ = _device_dtype(encoder)
        output = encoder(_tokens(tokenizer, prompts).to(device), output_hidden_states=True)
        if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, P)
            pooled = output[0]
        hidden_states.append(output.hidden_states[-2])  # (B, 77, D_i): penultimate layer
    _, dtype = _device_dtype(pipe.text_encoder_2)
    embeds = torch.cat(hidden_states, dim=-1).to(dtype)  # (B, 77, D1 + D2)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled.to(dtype)}  # type: ignore[union-attr]


def encode_text(pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompt embeddings as the pipeline computes them for `prompts` (no CFG, one image per prompt)."""
    prompts = list(prompts)
    family = detect_family(pipe)
    if family in ("sd1", "sd2"):
        return {"prompt_embeds": _clip_last_hidden(pipe.tokenizer, pipe.text_encoder, prompts)}
    if family == "sdxl":
        return _sdxl(pipe, prompts)
    from personalize.models.families import describe

    described = describe(family)  # DiT families: their description says how a prompt becomes embeddings
    if described is not None:
        return described.encode_prompt(pipe, prompts)
    raise ValueError(f"encode_text does not support the {family} family")


def vae_factors(config: Mapping[str, Any]) -> tuple[int, int]:
    """(spatial, temporal) downsampling of a VAE from its config: video VAEs name theirs
    (scale_factor_spatial / _temporal), image VAEs halve once per block after the first."""
    if "temperal_downsample" in config:  # Wan / Qwen-Image style: one halving per stage, some also in time
        stages = list(config["temperal_downsample"])
        spatial = config.get("scale_factor_spatial") or 2 ** len(stages)
        return int(spatial), int(config.get("scale_factor_temporal") or 2 ** sum(map(bool, stages)))
    return 2 ** (len(config["block_out_channels"]) - 1), 1


def channel_statistics(vae: Any, ndim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) of each latent channel, shaped to broadcast over latents of `ndim` dims; None when
    the VAE scales all channels alike (scaling_factor / shift_factor)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return None
    shape = (1, len(mean)) + (1,) * (ndim - 2)
    return torch.tensor(mean).reshape(shape), torch.tensor(std).reshape(shape)


def latent_scale(vae: Any) -> tuple[float, float]:
    """(shift_factor, scaling_factor) from the VAE config (shift 0 when it has none)."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(shift or 0.0), float(vae.config.scaling_factor)


def encode_images(
    vae: Any, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, 3, [F,] H, W) in [-1, 1] -> (B, C, [F',] H/8, W/8) scaled latents (posterior mean unless sample=True)."""
    device, dtype = _device_dtype(vae)
    one_frame = pixels.ndim == 4 and "temperal_downsample" in vae.config  # an image through a video-style VAE
    pixels = pixels.to(device=device, dtype=dtype)
    if vae.config.get("in_channels") == 4 and pixels.shape[1] == 3:  # an RGBA VAE (Qwen-Image 2.1): opaque alpha
        pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)  # (B, 4, [F,] H, W)
    posterior = vae.encode(pixels.unsqueeze(2) if one_frame else pixels).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mean  # (B, C, [F,] h, w)
    latents = latents[:, :, 0] if one_frame else latents  # (B, C, h, w)
    if getattr(vae, "bn", None) is not None:  # AutoencoderKLFlux2: batch-normalized 2x2 patches
        return normalize_patches(latents, vae.bn.running_mean, vae.bn.running_var, vae.config.batch_norm_eps)
    statistics = channel_statistics(vae, latents.ndim)
    if statistics is not None:
        mean, std = (value.to(latents.device, latents.dtype) for value in statistics)
        return (latents - mean) / std
    shift, scale = latent_scale(vae)
    return (latents - shift) * scale


def normalize_patches(latents: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2): 2x2 patches (channel-major inside a patch, as Flux2Pipeline's
    _patchify_latents), each channel normalized by the VAE's batch-norm statistics (4C,)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    std = torch.sqrt(var.to(patches) + eps)
    return (patches - mean.to(patches).view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
