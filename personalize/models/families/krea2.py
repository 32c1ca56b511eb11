"""Krea 2 (Raw, Turbo): a single-stream GQA DiT on 12 fused Qwen3-VL layers, Qwen-Image's VAE, packed 2x2.

Facts from diffusers' Krea2Pipeline / Krea2Transformer2DModel and examples/dreambooth/
train_dreambooth_lora_krea2.py: the prompt sits in Qwen-Image's chat template padded *in the middle*
([prefix | prompt | PAD | suffix]) to a fixed 512 tokens after the 34 dropped prefix tokens, with positions
that skip the padding; hidden states 2, 5, ..., 35 of Qwen3-VL-4B are stacked per token (B, 512, 12, 2560)
and a boolean mask marks the real tokens (the fixed length is part of the model: no trimming); the VAE is
AutoencoderKLQwenImage (one frame, per-channel mean/std); latents are packed in 2x2 patches (in_channels 64);
position ids are zeros for the text and (0, row, column) for each patch; the transformer takes t / 1000 and
predicts the velocity; the script's defaults: rank/alpha 32 on the authors' layer list, lr 3e-4, 1000 steps
(README_krea2.md), uniform timesteps ("none"), target = noise - x0. Turbo is TDM-distilled (a fixed shift).
"""

from __future__ import annotations

from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription
from personalize.models.families.flux import image_ids, pack, unpack

TEXT_TOKENS = 512  # Krea2Pipeline's fixed max_sequence_length
RECOMMENDED = [  # the Krea 2 authors' layer list (the reference script's default)
    r"img_in|final_layer\.linear|time_mod_proj|time_embed\.linear_[12]|txt_in\.linear_[12]|text_fusion\.projector",
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|to_gate)",
    r"transformer_blocks\.\d+\.ff\.(up|down)",
]
ATTENTION = [r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|to_gate)"]  # the authors' long-run set
ALL_LINEAR = [r"transformer_blocks\.\d+\..*"]


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    embeds, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=TEXT_TOKENS)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.long()}  # (B, 512, L, D), (B, 512)


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds, guidance: float | None
) -> torch.Tensor:
    _, _, h, w = noisy.shape
    text = embeds["prompt_embeds"]  # (B, T, L, D)
    text_ids = torch.zeros(text.shape[1], 3, device=noisy.device)
    positions = torch.cat([text_ids, image_ids(h, w, noisy.device, torch.float32)])  # (T + h/2 * w/2, 3)
    output = transformer(
        hidden_states=pack(noisy),  # (B, h/2 * w/2, 4C)
        encoder_hidden_states=text,
        timestep=timesteps.to(noisy.dtype) / 1000,
        position_ids=positions,
        encoder_attention_mask=embeds["prompt_embeds_mask"].bool(),
        return_dict=False,
    )[0]  # (B, h/2 * w/2, 4C)
    return unpack(output, h, w)


KREA2 = dict(  # Krea2Transformer2DModel's defaults, the released model's
    _class_name="Krea2Transformer2DModel",
    in_channels=64,
    num_layers=28,
    attention_head_dim=128,
    num_attention_heads=48,
    num_key_value_heads=12,
    intermediate_size=16384,
    timestep_embed_dim=256,
    text_hidden_dim=2560,
    num_text_layers=12,
    text_num_attention_heads=20,
    text_num_key_value_heads=20,
    text_intermediate_size=6912,
    num_layerwise_text_blocks=2,
    num_refiner_text_blocks=2,
    axes_dims_rope=[32, 48, 48],
    rope_theta=1000.0,
)

KREA2_FAMILY = FamilyDescription(
    name="krea2",
    pipeline_class="Krea2Pipeline",
    transformer_class="Krea2Transformer2DModel",
    text_encoders=("text_encoder",),
    trainable_text_encoders=(),  # the reference trains the transformer only
    tiny_names=("tiny-krea2",),
    matches=lambda config: "num_layerwise_text_blocks" in config and "text_hidden_dim" in config,
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: 2,
    latent_channels=lambda config: int(config.get("in_channels", 64)) // 4,  # in_channels counts 2x2 patches
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=None,
    targets={"recommended": RECOMMENDED, "attention": ATTENTION, "all-linear": ALL_LINEAR},
    default_targets="recommended",
    defaults={"lora": (32, 3e-4, 1000), "dora": (32, 3e-4, 1000)},
    defaults_source="diffusers' train_dreambooth_lora_krea2.py defaults (rank/alpha 32 on the Krea 2 authors' "
    "layer list, uniform timesteps) and README_krea2.md (lr 3e-4, 1000 steps)",
    full_precision=(r"(img_in|final_layer\..*|time_embed\..*|time_mod_proj|txt_in\..*|text_fusion\..*)",),
    published={"krea/Krea-2-Raw": KREA2, "krea/Krea-2-Turbo": KREA2},
    text_tokens=lambda config: TEXT_TOKENS,
    image_tokens=lambda config, h, w: (h // 2) * (w // 2),
    embed_keys=("prompt_embeds", "prompt_embeds_mask"),
    embed_shapes=lambda config: {
        "prompt_embeds": (TEXT_TOKENS, int(config["num_text_layers"]), int(config["text_hidden_dim"])),
        "prompt_embeds_mask": (TEXT_TOKENS,),
    },
    single_file_prefix="lycoris",  # as the Qwen-Image stack; ComfyUI's Krea 2 mapping not verified (README)
    encoder_parameters=4.44e9 + 0.127e9,  # Qwen3-VL-4B + the Qwen-Image VAE
)
