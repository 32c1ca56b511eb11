"""Qwen-Image: a 60-block double-stream MMDiT on Qwen2.5-VL's last hidden state, packed 2x2 latents.

Facts from diffusers' QwenImagePipeline and examples/dreambooth/train_dreambooth_lora_qwen_image.py: the
prompt goes through Qwen's chat template (a fixed system prompt whose first 34 tokens are dropped) and the
text encoder's last hidden state is the sequence, unpadded per prompt (a mask marks the real tokens; at most
1024 tokens, the script's default 512); the VAE (AutoencoderKLQwenImage, Wan-style, one frame) normalizes each
of its 16 channels by the published mean/std; latents are packed in 2x2 patches like Flux's and the
transformer builds its own 3D rotary positions from `img_shapes` (frame, rows, columns); it takes t / 1000;
no guidance input (true CFG at inference); the script trains attention q/k/v/out with uniform timesteps
("none") on target = noise - x0, from the scheduler's table (its shift is dynamic, so none is applied).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription, pad_rows, trim_padding
from personalize.models.families.flux import pack, unpack

TEXT_TOKENS = 512  # the cache pads every prompt to this (the script's --max_sequence_length); training trims
ATTENTION = [r"(.*\.)?attn\.(to_q|to_k|to_v|to_out\.0)"]  # the reference script's default
JOINT = [r"(.*\.)?attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"]
FEED_FORWARD = [r"(.*\.)?(img_mlp|txt_mlp)\.net\.(0\.proj|2)"]
ALL_LINEAR = [r"transformer_blocks\.\d+\..*"]  # + the AdaLN modulations img_mod / txt_mod


PLANNED_TOKENS = 64  # the planner's prompt length


def prompt_shapes(config: Mapping[str, Any], tokens: int) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of a `tokens`-long prompt's embeddings and mask (the planner's meta tensors)."""
    return {"prompt_embeds": (tokens, int(config["joint_attention_dim"])), "prompt_embeds_mask": (tokens,)}


def processor_components(source: str, qwen3: bool = False, **kwargs: Any) -> dict[str, Any]:
    """`from_pretrained` components of a Qwen-Image-Edit (`qwen3`: Qwen-Image 2.1) folder or hub id: where
    torchvision is missing, its processor read without the video half (else none: transformers builds it)."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return {}
    from personalize.models.vl_processor import image_only_processor  # imports transformers: only when needed

    return {"processor": image_only_processor(source, subfolder="processor", qwen3=qwen3, **kwargs)}


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    embeds, mask = pipe.encode_prompt(prompts, device=device, max_sequence_length=TEXT_TOKENS)  # (B, T, D)
    lengths = mask.sum(dim=1).tolist() if mask is not None else [embeds.shape[1]] * len(prompts)
    padded, mask = pad_rows([row[: int(length)] for row, length in zip(embeds, lengths)], TEXT_TOKENS)
    return {"prompt_embeds": padded, "prompt_embeds_mask": mask}  # (B, 512, D), (B, 512)


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: Embeds,
    guidance: float | None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """One transformer call; `reference` (B, C, h', w') latents join as packed tokens after the noisy ones with
    an `img_shapes` entry of their own (Qwen-Image-Edit), and only the noisy tokens' prediction comes back."""
    b, _, h, w = noisy.shape
    embeds = trim_padding(embeds)
    tokens, shapes = pack(noisy), [(1, h // 2, w // 2)]  # (B, h/2 * w/2, 4C)
    if reference is not None:
        tokens = torch.cat([tokens, pack(reference.to(noisy.dtype))], dim=1)  # (B, N + N', 4C)
        shapes.append((1, reference.shape[-2] // 2, reference.shape[-1] // 2))
    output = transformer(
        hidden_states=tokens,
        encoder_hidden_states=embeds["prompt_embeds"],
        encoder_hidden_states_mask=embeds["prompt_embeds_mask"],
        timestep=timesteps.to(noisy.dtype) / 1000,
        img_shapes=[shapes] * b,
        return_dict=False,
    )[0]  # (B, N (+ N'), 4C)
    return unpack(output[:, : (h // 2) * (w // 2)], h, w)


QWEN_IMAGE = dict(
    _class_name="QwenImageTransformer2DModel",
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    guidance_embeds=False,
    axes_dims_rope=[16, 56, 56],
)

QWEN_IMAGE_FAMILY = FamilyDescription(
    name="qwen-image",
    pipeline_class="QwenImagePipeline",
    transformer_class="QwenImageTransformer2DModel",
    text_encoders=("text_encoder",),
    trainable_text_encoders=(),  # the reference trains the transformer only (a 7B VLM)
    tiny_names=("tiny-qwen-image",),
    matches=lambda config: config.get("_class_name") == "QwenImageTransformer2DModel" or "use_layer3d_rope" in config,
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: int(config.get("patch_size", 2)),
    latent_channels=lambda config: int(config.get("out_channels") or 16),
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=None,
    targets={
        "attention": ATTENTION,
        "joint-attention": JOINT,
        "attention+ff": JOINT + FEED_FORWARD,
        "all-linear": ALL_LINEAR,
    },
    default_targets="attention",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="diffusers' train_dreambooth_lora_qwen_image.py defaults (rank 4, lr 1e-4, attention "
    "to_q/to_k/to_v/to_out.0, uniform timesteps) and README_qwen.md",
    full_precision=(r"(img_in|txt_in|txt_norm|proj_out|norm_out\.linear|time_text_embed\..*)",),
    published={"Qwen/Qwen-Image": QWEN_IMAGE},
    text_tokens=lambda config: PLANNED_TOKENS,  # a DreamBooth caption + the template's tail
    image_tokens=lambda config, h, w: (h // 2) * (w // 2),
    embed_keys=("prompt_embeds", "prompt_embeds_mask"),
    embed_shapes=lambda config: prompt_shapes(config, PLANNED_TOKENS),
    single_file_prefix="lycoris",  # ComfyUI reads lycoris_<diffusers path> for this family (README)
    encoder_parameters=8.29e9 + 0.127e9,  # Qwen2.5-VL-7B + the Wan-2.1-style VAE
)
