"""Flux.2 [dev]: Mistral Small 3.1 text features, 4-axis rotary positions, batch-normalized 2x2 latents.

Facts from diffusers' Flux2Pipeline, AutoencoderKLFlux2 and examples/dreambooth/train_dreambooth_lora_flux2.py
(+ _img2img.py for reference images):
- latents: the VAE mean (B, 32, h, w) is patchified into 2x2 (B, 128, h/2, w/2) and normalized with the
  VAE's batch-norm running statistics, (z - mean) / sqrt(var + eps); personalize.models.encode does
  this for every AutoencoderKLFlux2, so the recipe trains on (B, 128, h/2, w/2) and packing is a reshape
  to (B, h/2 * w/2, 128) tokens;
- position ids have four axes (T, H, W, L): image tokens (0, row, column, 0); text tokens (0, 0, 0, l);
  a reference image (edit) gets T = 10 (the pipeline's first reference image), its own rows and columns;
- text: the hidden states of Mistral layers 10, 20 and 30 for the system message + prompt chat,
  stacked per token into (B, 512, 3 x 5120);
- timestep t / 1000; FLUX.2-dev is guidance-distilled: the guidance scale is an input (reference 3.5);
- the script samples timesteps uniformly ("none") and adapts to_q/k/v/out.0 and the single blocks' fused
  to_qkv_mlp_proj and attn.to_out (rank 4, lr 1e-4).
"""

from __future__ import annotations

from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription

REFERENCE_T = 10  # Flux2Pipeline._prepare_image_ids: T of the first reference image (scale 10)

ATTENTION = [  # the single blocks fuse q/k/v with the MLP input (to_qkv_mlp_proj): attention there is the fused pair
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)",
]
REFERENCE = [  # train_dreambooth_lora_flux2.py's default target list
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
    r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)",
]
FEED_FORWARD = [r"(.*\.)?(ff|ff_context)\.(linear_in|linear_out)"]
ALL_LINEAR = [r"(single_)?transformer_blocks\.\d+\..*"]


def position_ids(t: int, h: int, w: int, device: Any) -> torch.Tensor:
    """(h * w, 4): (t, row, column, 0) of each latent token, row-major."""
    rows, columns = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.full_like(rows, t), rows, columns, torch.zeros_like(rows)], dim=-1)
    return ids.reshape(-1, 4).to(device)


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    embeds, _ = pipe.encode_prompt(prompts, device=device)  # text ids are rebuilt from the length
    return {"prompt_embeds": embeds}  # (B, T, 3 x D)


def predict(
    transformer: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: Embeds,
    guidance: float | None,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents (B, 4C, h, w) already in 2x2 patches; `reference` (B, 4C, h', w') joins as tokens at T = 10."""
    b, c, h, w = noisy.shape
    text = embeds["prompt_embeds"]  # (B, T, D)
    tokens, ids = noisy.flatten(2).transpose(1, 2), position_ids(0, h, w, noisy.device)  # (B, N, 4C), (N, 4)
    if reference is not None:
        tokens = torch.cat([tokens, reference.to(noisy.dtype).flatten(2).transpose(1, 2)], dim=1)  # (B, N + N', 4C)
        ids = torch.cat([ids, position_ids(REFERENCE_T, *reference.shape[-2:], noisy.device)])
    text_ids = torch.zeros(text.shape[1], 4, dtype=torch.long, device=noisy.device)
    text_ids[:, 3] = torch.arange(text.shape[1])  # (T, 4): (0, 0, 0, l)
    config = getattr(transformer, "module", transformer).config
    guidance_input = None
    if guidance is not None and config.guidance_embeds:
        guidance_input = torch.full((b,), float(guidance), device=noisy.device, dtype=noisy.dtype)
    output = transformer(
        hidden_states=tokens,
        encoder_hidden_states=text,
        timestep=timesteps.to(noisy.dtype) / 1000,
        guidance=guidance_input,
        img_ids=ids.expand(b, -1, -1),  # (B, N (+ N'), 4)
        txt_ids=text_ids.expand(b, -1, -1),  # (B, T, 4)
        return_dict=False,
    )[0]  # (B, N (+ N'), 4C)
    return output[:, : h * w].transpose(1, 2).reshape(b, c, h, w)


FLUX2_DEV = dict(  # black-forest-labs/FLUX.2-dev transformer/config.json (= the class defaults)
    _class_name="Flux2Transformer2DModel",
    patch_size=1,
    in_channels=128,
    num_layers=8,
    num_single_layers=48,
    attention_head_dim=128,
    num_attention_heads=48,
    joint_attention_dim=15360,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=[32, 32, 32, 32],
    rope_theta=2000,
    guidance_embeds=True,
)

# The layers ComfyUI's diffusers (Flux) name map leaves out, written under their ComfyUI names
ORIGINAL_NAMES = (
    ("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
    ("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
    ("single_stream_modulation.linear", "single_stream_modulation.lin"),
    ("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
)

FLUX2 = FamilyDescription(
    name="flux2",
    pipeline_class="Flux2Pipeline",
    transformer_class="Flux2Transformer2DModel",
    text_encoders=("text_encoder",),
    trainable_text_encoders=(),  # the reference script trains the transformer only
    tiny_names=("tiny-flux2",),
    matches=lambda config: "timestep_guidance_channels" in config and bool(config.get("guidance_embeds", True)),
    encode_prompt=encode_prompt,
    predict=predict,
    predict_edit=predict,
    embed_keys=("prompt_embeds",),
    latent_multiple=lambda config: 2,  # the VAE latent must split into 2x2 patches
    latent_channels=lambda config: int(config.get("in_channels", 128)) // 4,
    trained_latents=lambda config, h, w: (int(config.get("in_channels", 128)), h // 2, w // 2),
    embed_shapes=lambda config: {"prompt_embeds": (512, int(config["joint_attention_dim"]))},
    encoder_parameters=24.0e9 + 84e6,  # Mistral Small 3.1 (24B, with its vision tower), the VAE
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=3.5,
    targets={
        "attention": ATTENTION,
        "attention+ff": ATTENTION + FEED_FORWARD,
        "reference": REFERENCE,
        "all-linear": ALL_LINEAR,
    },
    default_targets="reference",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="diffusers' train_dreambooth_lora_flux2.py defaults (rank 4, lr 1e-4, guidance 3.5, uniform "
    "timesteps; targets to_q/k/v/out.0 + the single blocks' to_qkv_mlp_proj and attn.to_out) and README_flux2.md",
    full_precision=(r"(x_embedder|context_embedder|proj_out|norm_out\.linear|time_guidance_embed\..*)",),
    published={"black-forest-labs/FLUX.2-dev": FLUX2_DEV},
    single_file_renames=ORIGINAL_NAMES,  # the rest: lora_transformer_<diffusers path>
    text_tokens=lambda config: 512,  # the pipeline's max_sequence_length
    image_tokens=lambda config, h, w: (h // 2) * (w // 2),
)
