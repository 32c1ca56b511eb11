"""Stable Diffusion 3 / 3.5 (MMDiT): CLIP-L + CLIP-G pooled, CLIP + T5 sequence, latents in patches of 2.

Facts from diffusers' StableDiffusion3Pipeline and examples/dreambooth/train_dreambooth_lora_sd3.py:
the transformer patchifies (B, C, h, w) latents itself and takes the raw timestep (0..1000); there is no
guidance input; the reference script samples timesteps logit-normal and preconditions the output
(x0_hat = -sigma * prediction + x_t, compared with x0: the velocity loss weighted by sigma^2).
SD3.5 adds QK norms and (medium) a second attention (`attn2`) in the first blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription

ATTENTION = [
    r"(.*\.)?(attn|attn2)\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
]
FEED_FORWARD = [r"(.*\.)?(ff|ff_context)\.net\.(0\.proj|2)"]
ALL_LINEAR = [r"transformer_blocks\.\d+\..*"]


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, prompts, prompts, device=device, do_classifier_free_guidance=False
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (B, 77 + T5 len, D), (B, P1 + P2)


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds, guidance: float | None
) -> torch.Tensor:
    return transformer(
        hidden_states=noisy,  # (B, C, h, w)
        timestep=timesteps,
        encoder_hidden_states=embeds["prompt_embeds"],
        pooled_projections=embeds["pooled_prompt_embeds"],
        return_dict=False,
    )[0]  # (B, C, h, w)


SD3_MEDIUM = dict(
    _class_name="SD3Transformer2DModel",
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD35_MEDIUM = {**SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))}
SD35_LARGE = {
    **SD3_MEDIUM,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}

SD3 = FamilyDescription(
    name="sd3",
    pipeline_class="StableDiffusion3Pipeline",
    transformer_class="SD3Transformer2DModel",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    trainable_text_encoders=("text_encoder", "text_encoder_2"),
    tiny_names=("tiny-sd3",),
    matches=lambda config: "joint_attention_dim" in config and "caption_projection_dim" in config,
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: int(config.get("patch_size", 2)),
    latent_channels=lambda config: int(config.get("in_channels", 16)),
    weighting_scheme="logit_normal",
    precondition_outputs=True,
    guidance_scale=None,
    targets={"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD, "all-linear": ALL_LINEAR},
    default_targets="attention",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="diffusers' train_dreambooth_lora_sd3.py defaults (rank 4, lr 1e-4, attention targets, "
    "logit-normal timesteps, preconditioned outputs) and README_sd3.md (500 steps)",
    published={
        "stabilityai/stable-diffusion-3-medium-diffusers": SD3_MEDIUM,
        "stabilityai/stable-diffusion-3.5-medium": SD35_MEDIUM,
        "stabilityai/stable-diffusion-3.5-large": SD35_LARGE,
        "stabilityai/stable-diffusion-3.5-large-turbo": SD35_LARGE,
    },
    text_tokens=lambda config: 77 + 256,  # CLIP tokens + the pipeline's T5 max_sequence_length
    image_tokens=lambda config, h, w: (h // int(config.get("patch_size", 2))) * (w // int(config.get("patch_size", 2))),
)
