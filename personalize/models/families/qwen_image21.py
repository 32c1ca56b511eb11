"""Qwen-Image 2.1: a single-stream, block-causal DiT on Qwen3-VL's hidden states and a 16x RGBA VAE.

Facts from diffusers' QwenImage21Pipeline and QwenImage21Transformer2DModel: the prompt goes through Qwen's
ChatML with the system prompt "Comprehend and analyze the provided prompt." (its tokens are dropped), and the
text encoder's last decoder layer *before* its final norm is the sequence (the pipeline hooks the norm away),
unpadded per prompt, with a mask of the positions the encoder reserved for image slots (none for text-to-image);
the VAE (AutoencoderKLQwenImage21) takes RGBA, compresses 16x into 64 channels normalized by the published
mean/std, and the transformer takes those latents unpatched, one token per latent pixel (patch_size 1);
text and image tokens share one sequence: `img_mask` marks one slot per 2x2 group of target tokens after the
text; `img_shapes` gives the target's (frame, rows, columns) in latent tokens; it takes t / 1000; with
`causal_condition` the text is modulated from t = 0 inside the transformer; no guidance input (true CFG). No
reference training script ships with diffusers 0.42, so the objective is Qwen-Image's script's (uniform
timesteps, target noise - x0) and the targets diffusers' `_tp_plan` names (attention q/k/v/out, SwiGLU).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from personalize.models.families import qwen_image
from personalize.models.families.description import Embeds, FamilyDescription, pad_rows, trim_padding

TEXT_TOKENS = 512  # the cache pads every prompt to this; training trims the shared padding
ATTENTION = [r"(.*\.)?attn\.(to_q|to_k|to_v|to_out\.0)"]
FEED_FORWARD = [r"(.*\.)?img_mlp\.(proj|gate_layer|out)"]
ALL_LINEAR = [r"transformer_blocks\.\d+\..*"]  # the blocks hold no modulation of their own (one shared)


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    embeds, mask, slots = pipe.encode_prompt(prompts, device=device)  # (B, T, D), (B, T) or None, (B, T) bool
    lengths = mask.sum(dim=1).tolist() if mask is not None else [embeds.shape[1]] * len(prompts)
    padded, mask = pad_rows([row[: int(n)] for row, n in zip(embeds, lengths)], TEXT_TOKENS)
    slots, _ = pad_rows([row[: int(n)].long() for row, n in zip(slots, lengths)], TEXT_TOKENS)
    return {"prompt_embeds": padded, "prompt_embeds_mask": mask, "prompt_embeds_image_slots": slots}


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds, guidance: float | None
) -> torch.Tensor:
    b, c, h, w = noisy.shape
    embeds = trim_padding(embeds)
    # masks stay where the caller put them: the planner's trace keeps their values on the CPU (meta_trace)
    slots = embeds["prompt_embeds_image_slots"].bool()  # (B, T): the encoder's image slots
    target_slots = torch.ones(b, h * w // 4, dtype=torch.bool, device=slots.device)  # one per 2x2 target tokens
    output = transformer(
        hidden_states=noisy.flatten(2).transpose(1, 2),  # (B, h * w, C): unpatched latents
        timestep=timesteps.to(noisy.dtype) / 1000,
        encoder_hidden_states=embeds["prompt_embeds"],
        encoder_hidden_states_mask=embeds["prompt_embeds_mask"].bool(),
        img_shapes=[[(1, h, w)]] * b,
        img_mask=torch.cat([slots, target_slots], dim=1),
        return_dict=False,
    )[0]  # (B, h * w, C)
    return output[:, -h * w :].transpose(1, 2).reshape(b, c, h, w)


QWEN_IMAGE_21 = dict(  # QwenImage21Transformer2DModel's defaults, which diffusers documents as 2.1's
    _class_name="QwenImage21Transformer2DModel",
    patch_size=1,
    in_channels=64,
    out_channels=64,
    num_layers=32,
    attention_head_dim=128,
    num_attention_heads=32,
    context_in_dim=4096,
    mlp_ratio=3,
    axes_dims_rope=[16, 56, 56],
    causal_condition=True,
)

QWEN_IMAGE_21_FAMILY = FamilyDescription(
    name="qwen-image-21",
    pipeline_class="QwenImage21Pipeline",
    transformer_class="QwenImage21Transformer2DModel",
    text_encoders=("text_encoder",),
    trainable_text_encoders=(),
    tiny_names=("tiny-qwen-image21",),
    matches=lambda config: (
        config.get("_class_name") == "QwenImage21Transformer2DModel"
        or ("causal_condition" in config and "context_in_dim" in config)
    ),
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: 2,  # one image slot per 2x2 latent tokens
    latent_channels=lambda config: int(config.get("in_channels") or 64),
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=None,
    targets={"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD, "all-linear": ALL_LINEAR},
    default_targets="attention",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="Qwen-Image's reference script defaults (rank 4, lr 1e-4, attention q/k/v/out, uniform "
    "timesteps): diffusers 0.42 ships no Qwen-Image 2.1 training script",
    full_precision=(r"(img_in|txt_in\..*|proj_out|norm_out\..*|time_text_embed\..*|modulation\..*)",),
    published={"Qwen/Qwen-Image-2.1": QWEN_IMAGE_21},
    text_tokens=lambda config: 64,
    image_tokens=lambda config, h, w: h * w,  # each slot becomes 4 latent tokens in the joint sequence
    embed_keys=("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_image_slots"),
    embed_shapes=lambda config: {
        "prompt_embeds": (64, int(config["context_in_dim"])),
        "prompt_embeds_mask": (64,),
        "prompt_embeds_image_slots": (64,),
    },
    single_file_prefix="lycoris",  # as Qwen-Image's (README)
    vae_stages=4,  # 16x
    encoder_parameters=8.77e9 + 0.2e9,  # Qwen3-VL-8B + the 16x VAE (approximate)
    load_components=partial(qwen_image.processor_components, qwen3=True),  # no torchvision needed
)
