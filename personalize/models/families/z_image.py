"""Z-Image (base and Turbo): a single-stream S3-DiT on Qwen3's second-to-last hidden state, Flux's VAE.

Facts from diffusers' ZImagePipeline / ZImageTransformer2DModel and examples/dreambooth/
train_dreambooth_lora_z_image.py: the prompt goes through Qwen3's chat template (generation prompt, thinking
enabled), is padded to 512 tokens and only the real tokens of hidden_states[-2] are kept, one variable-length
(T_i, 2560) tensor per prompt; the transformer takes lists (latents (C, 1, h, w) with a frame axis, captions
(T_i, D)), patchifies 2x2 itself, and takes the reversed, normalized time (1000 - t) / 1000; its output is the
negated velocity, so the prediction is -output; latents (x - shift) * scale of the 16-channel Flux VAE; the
scheduler's static shift (3.0) is in its training table; the script trains attention q/k/v/out with uniform
timesteps ("none") on target = noise - x0. Turbo is step-distilled (8 steps): fine-tuning it wears that off
the same way as for FLUX.1-schnell, but its config is the base model's, so no caveat can be read from it.
"""

from __future__ import annotations

from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription, pad_rows, trim_padding

TEXT_TOKENS = 512  # ZImagePipeline's max_sequence_length
ATTENTION = [r"(.*\.)?attention\.(to_q|to_k|to_v|to_out\.0)"]  # the reference script's default
FEED_FORWARD = [r"(.*\.)?feed_forward\.(w1|w2|w3)"]
ALL_LINEAR = [r"(layers|noise_refiner|context_refiner)\.\d+\..*"]  # + the AdaLN modulations


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    rows, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False)  # [(T_i, D)]
    padded, mask = pad_rows(list(rows), TEXT_TOKENS)
    return {"prompt_embeds": padded, "prompt_embeds_mask": mask}  # (B, 512, D), (B, 512)


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds, guidance: float | None
) -> torch.Tensor:
    embeds = trim_padding(embeds)
    text, mask = embeds["prompt_embeds"], embeds["prompt_embeds_mask"]  # (B, T, D), (B, T)
    captions = list(text) if mask.is_meta else [row[keep.bool()] for row, keep in zip(text, mask)]  # [(T_i, D)]
    images = list(noisy.unsqueeze(2).unbind(0))  # [(C, 1, h, w)]: one frame each
    output = transformer(images, (1000 - timesteps.to(noisy.dtype)) / 1000, captions, return_dict=False)[0]
    return -torch.stack(output).squeeze(2)  # (B, C, h, w): Z-Image predicts x0 - noise


Z_IMAGE = dict(
    _class_name="ZImageTransformer2DModel",
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)

Z_IMAGE_FAMILY = FamilyDescription(
    name="z-image",
    pipeline_class="ZImagePipeline",
    transformer_class="ZImageTransformer2DModel",
    text_encoders=("text_encoder",),
    trainable_text_encoders=(),  # the reference trains the transformer only
    tiny_names=("tiny-z-image",),
    matches=lambda config: "cap_feat_dim" in config and "all_patch_size" in config,
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: int(config.get("all_patch_size", [2])[0]),
    latent_channels=lambda config: int(config.get("in_channels", 16)),
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=None,
    targets={"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD, "all-linear": ALL_LINEAR},
    default_targets="attention",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="diffusers' train_dreambooth_lora_z_image.py defaults (rank 4, lr 1e-4, attention "
    "to_q/to_k/to_v/to_out.0, uniform timesteps) and README_z_image.md",
    full_precision=(r"(all_x_embedder|all_final_layer|cap_embedder|t_embedder)\..*",),
    published={"Tongyi-MAI/Z-Image-Turbo": Z_IMAGE, "Tongyi-MAI/Z-Image": Z_IMAGE},
    text_tokens=lambda config: 64,  # planned prompt length (captions are unpadded)
    image_tokens=lambda config, h, w: (h // 2) * (w // 2),
    embed_keys=("prompt_embeds", "prompt_embeds_mask"),
    embed_shapes=lambda config: {"prompt_embeds": (64, int(config["cap_feat_dim"])), "prompt_embeds_mask": (64,)},
    block_pattern=r"(layers|noise_refiner|context_refiner)\.\d+",
    single_file_prefix="lycoris",  # ComfyUI reads lycoris_<diffusers path> for this family (README)
    encoder_parameters=4.02e9 + 84e6,  # Qwen3-4B + the Flux VAE
)
