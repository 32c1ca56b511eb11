"""Flux.1 (dev, schnell): double- and single-stream MMDiT, CLIP-L pooled + T5 sequence, packed 2x2 latents.

Facts from diffusers' FluxPipeline and examples/dreambooth/train_dreambooth_lora_flux.py: latents
(B, C, h, w) are packed into 2x2 patches (B, h/2 * w/2, 4C); image position ids are (row, column)
of each patch in channels 1 and 2 (channel 0 stays 0), text ids are zeros (T, 3); the transformer
takes timestep t / 1000; FLUX.1-dev is guidance-distilled and takes the guidance scale as an input
(reference default 3.5), schnell (guidance_embeds false) is timestep-distilled; the reference
script samples timesteps uniformly ("none") and trains on target = noise - x0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription

ATTENTION = [r"(.*\.)?attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"]
FEED_FORWARD = [r"(.*\.)?(ff|ff_context)\.net\.(0\.proj|2)"]  # with ATTENTION: the reference script's default
ALL_LINEAR = [r"(single_)?transformer_blocks\.\d+\..*"]  # + single-block proj_mlp/proj_out and AdaLN


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, channel-major inside a patch."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of `pack`."""
    b, _, channels = tokens.shape
    patches = tokens.reshape(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device: Any, dtype: torch.dtype, index: int = 0) -> torch.Tensor:
    """(h/2 * w/2, 3): (index, row, column) of each 2x2 patch; index 0 is the generated image, 1 a reference
    image (Flux Kontext)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder_2.parameters()).device
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device)  # text ids are rebuilt as zeros
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (B, T, D), (B, P)


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: Embeds,
    guidance: float | None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """One transformer call; `reference` (B, C, h', w') latents join as packed tokens with position index 1
    after the noisy ones (Flux Kontext), and only the noisy tokens' prediction comes back."""
    b, _, h, w = noisy.shape
    text = embeds["prompt_embeds"]  # (B, T, D)
    guidance_input = None
    config = getattr(transformer, "module", transformer).config  # DDP wraps the transformer in several processes
    if guidance is not None and config.guidance_embeds:
        guidance_input = torch.full((b,), float(guidance), device=noisy.device, dtype=noisy.dtype)
    tokens, ids = pack(noisy), image_ids(h, w, noisy.device, noisy.dtype)  # (B, N, 4C), (N, 3)
    if reference is not None:
        reference = reference.to(noisy.dtype)
        rh, rw = reference.shape[-2:]
        tokens = torch.cat([tokens, pack(reference)], dim=1)  # (B, N + N', 4C)
        ids = torch.cat([ids, image_ids(rh, rw, noisy.device, noisy.dtype, index=1)])
    output = transformer(
        hidden_states=tokens,
        timestep=timesteps.to(noisy.dtype) / 1000,
        guidance=guidance_input,
        pooled_projections=embeds["pooled_prompt_embeds"],
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=ids,
        return_dict=False,
    )[0]  # (B, N (+ N'), 4C)
    return unpack(output[:, : (h // 2) * (w // 2)], h, w)


def distilled(config: Mapping[str, Any]) -> str | None:
    if config.get("guidance_embeds"):
        return None
    return (
        "this Flux transformer has no guidance input: it is FLUX.1-schnell (timestep-distilled for 1-4 steps), and "
        "fine-tuning it wears that distillation off (images then need more steps and look softer); train on "
        "FLUX.1-dev, or accept this with --set allow_distilled=true"
    )


FLUX_DEV = dict(
    _class_name="FluxTransformer2DModel",
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)

FLUX = FamilyDescription(
    name="flux",
    pipeline_class="FluxPipeline",
    transformer_class="FluxTransformer2DModel",
    text_encoders=("text_encoder", "text_encoder_2"),
    trainable_text_encoders=("text_encoder",),
    tiny_names=("tiny-flux",),
    matches=lambda config: "axes_dims_rope" in config and "num_single_layers" in config,
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: 2,
    latent_channels=lambda config: int(config.get("in_channels", 64)) // 4,  # in_channels counts packed 2x2 patches
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=3.5,
    targets={"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD, "all-linear": ALL_LINEAR},
    default_targets="attention+ff",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="diffusers' train_dreambooth_lora_flux.py defaults (rank 4, lr 1e-4, attention + feed-forward "
    "targets) and README_flux.md (500 steps)",
    distilled=distilled,
    published={
        "black-forest-labs/FLUX.1-dev": FLUX_DEV,
        "black-forest-labs/FLUX.1-schnell": {**FLUX_DEV, "guidance_embeds": False},
    },
    text_tokens=lambda config: 512,  # FluxPipeline's max_sequence_length (T5)
    image_tokens=lambda config, h, w: (h // 2) * (w // 2),
)
