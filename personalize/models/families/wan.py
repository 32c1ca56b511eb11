"""Wan 2.1 text-to-video (1.3B, 14B): one UMT5 sequence, video latents (B, C, F, h, w) in patches of 1x2x2.

Facts from diffusers' WanPipeline / WanTransformer3DModel / AutoencoderKLWan and the published configs: the
transformer patchifies (B, 16, F, h, w) itself (patch (1, 2, 2)) and takes the raw timestep (0..1000);
the prompt is UMT5-XXL's last hidden state, zero past each prompt's tokens, 512 tokens (the pipeline's
max_sequence_length); no pooled embedding, no guidance input (classifier-free guidance at sampling only);
the VAE compresses 4x in time and 8x in space (clips of 4k + 1 frames) and normalises each latent channel
with its own mean and std (latents_mean / latents_std); the released scheduler is UniPC on flow sigmas with
flow_shift 3.0 (480p). Training as musubi-tuner's wan_train_network.py: timesteps uniform on the shifted
schedule (its `--timestep_sampling shift --discrete_flow_shift 3.0`), target noise - x0, no weighting,
LoRA on every Linear of the attention blocks (self-, cross-attention and feed-forward), 16 fps clips.
Wan 2.2 A14B (two experts) and TI2V-5B (per-token timesteps, 48-channel VAE) are not described yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription

ATTENTION = [r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"]
FEED_FORWARD = [r"blocks\.\d+\.ffn\.net\.(0\.proj|2)"]
ALL_LINEAR = [r"blocks\.\d+\..*"]  # with the I2V-style add_k/add_v projections where a model has them
TEXT_TOKENS = 512  # WanPipeline's max_sequence_length


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    embeds, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=TEXT_TOKENS, device=device
    )
    return {"prompt_embeds": embeds}  # (B, 512, 4096), zeros after each prompt's tokens


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds, guidance: float | None
) -> torch.Tensor:
    return transformer(
        hidden_states=noisy,  # (B, C, F, h, w)
        timestep=timesteps,
        encoder_hidden_states=embeds["prompt_embeds"],
        return_dict=False,
    )[0]  # (B, C, F, h, w)


def image_tokens(config: Mapping[str, Any], h: int, w: int) -> int:
    """Tokens of one latent frame: (h / 2) * (w / 2) for patch (1, 2, 2)."""
    _, patch_h, patch_w = config.get("patch_size", (1, 2, 2))
    return (h // patch_h) * (w // patch_w)


WAN21_13B = dict(
    _class_name="WanTransformer3DModel",
    patch_size=[1, 2, 2],
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
WAN21_14B = {**WAN21_13B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}

# ComfyUI maps Wan LoRAs by Wan's own module names only (lora_unet_blocks_0_self_attn_q, as musubi-tuner
# writes them), so the single file renames every layer: diffusers WanTransformer3DModel -> WanModel
ORIGINAL_NAMES = (
    *((f"blocks.{{}}.attn1.to_{p}", f"blocks.{{}}.self_attn.{p}") for p in "qkv"),
    ("blocks.{}.attn1.to_out.0", "blocks.{}.self_attn.o"),
    *((f"blocks.{{}}.attn2.to_{p}", f"blocks.{{}}.cross_attn.{p}") for p in "qkv"),
    ("blocks.{}.attn2.to_out.0", "blocks.{}.cross_attn.o"),
    ("blocks.{}.attn2.add_k_proj", "blocks.{}.cross_attn.k_img"),  # image-to-video models
    ("blocks.{}.attn2.add_v_proj", "blocks.{}.cross_attn.v_img"),
    ("blocks.{}.ffn.net.0.proj", "blocks.{}.ffn.0"),
    ("blocks.{}.ffn.net.2", "blocks.{}.ffn.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("patch_embedding", "patch_embedding"),
    ("proj_out", "head.head"),
)


WAN = FamilyDescription(
    name="wan",
    pipeline_class="WanPipeline",
    transformer_class="WanTransformer3DModel",
    text_encoders=("text_encoder",),
    trainable_text_encoders=(),  # UMT5-XXL is never trained (as musubi-tuner / ai-toolkit)
    tiny_names=("tiny-wan",),
    # text-to-video only: an image-to-video transformer (image_dim set) also takes CLIP image features
    matches=lambda config: "ffn_dim" in config and "text_dim" in config and not config.get("image_dim"),
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: int(config.get("patch_size", (1, 2, 2))[1]),
    latent_channels=lambda config: int(config.get("in_channels", 16)),
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=None,
    targets={"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD, "all-linear": ALL_LINEAR},
    default_targets="attention+ff",
    defaults={"lora": (32, 2e-4, 1000), "dora": (32, 2e-4, 1000)},
    defaults_source="musubi-tuner's Wan guide (network_dim 32, lr 2e-4, discrete_flow_shift 3.0, every Linear of "
    "the attention blocks); 1000 steps",
    full_precision=(r"(patch_embedding|condition_embedder\..*|proj_out)",),
    published={"Wan-AI/Wan2.1-T2V-1.3B-Diffusers": WAN21_13B, "Wan-AI/Wan2.1-T2V-14B-Diffusers": WAN21_14B},
    text_tokens=lambda config: TEXT_TOKENS,
    image_tokens=image_tokens,
    embed_keys=("prompt_embeds",),
    embed_shapes=lambda config: {"prompt_embeds": (TEXT_TOKENS, int(config["text_dim"]))},
    block_pattern=r"blocks\.\d+",
    single_file_renames=ORIGINAL_NAMES,  # every layer: ComfyUI reads none by its diffusers name
    encoder_parameters=5680e6 + 127e6,  # UMT5-XXL encoder + the Wan 2.1 VAE
    clip=(17, 16.0),  # 4 x 4 + 1 frames at Wan's 16 fps: one second
    native_resolution=480,  # the 480p model (832 x 480 videos): a 480 px side keeps about its pixel count
)
