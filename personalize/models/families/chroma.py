"""Chroma (Chroma1-HD / Base): Flux.1's double/single-stream layout, T5 only, no guidance input.

Facts from diffusers' ChromaPipeline and ChromaTransformer2DModel: latents are packed into 2x2 patches
with Flux's (0, row, column) image ids and zero text ids (flux.py); the prompt is T5 alone, encoded with
its attention mask, and the transformer gets a mask that is 1 for the text tokens up to and including
the first padding token (position <= prompt length) and for every image token, 0 elsewhere; the installed
ChromaPipeline passes it as a float tensor, which the attention adds to its logits (a +1 bias on the
kept pairs) rather than masking, and we pass it the same way so that training matches inference; there is no
pooled CLIP input and no distilled guidance input (Chroma uses real classifier-free guidance at
inference, so training sees none); timesteps go in as t / 1000; the AdaLN modulations come from one
`distilled_guidance_layer` (the "approximator") instead of per-block projections. diffusers ships no
Chroma training script: the objective defaults are those of its parent's script
(train_dreambooth_lora_flux.py: uniform timesteps, rank 4, lr 1e-4). The LoRA loader is Flux's mixin.
"""

from __future__ import annotations

from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription
from personalize.models.families.flux import ATTENTION, FEED_FORWARD, image_ids, pack, unpack

ALL_LINEAR = [r"(single_)?transformer_blocks\.\d+\..*"]  # attention, feed-forward, single-block proj_mlp/out


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder.parameters()).device
    embeds, _, mask, *_ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}  # (B, T, D), (B, T): 1 up to the first pad


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds, guidance: float | None
) -> torch.Tensor:
    b, _, h, w = noisy.shape
    text = embeds["prompt_embeds"]  # (B, T, D)
    tokens = (h // 2) * (w // 2)
    # The mask as ChromaPipeline builds it: 0 / 1 in the compute dtype (a float mask, which attention adds to
    # its logits; training sees exactly what inference does)
    image_mask = torch.ones(b, tokens, device=noisy.device, dtype=noisy.dtype)
    mask = torch.cat([embeds["prompt_attention_mask"].to(device=noisy.device, dtype=noisy.dtype), image_mask], dim=1)
    output = transformer(
        hidden_states=pack(noisy),  # (B, N, 4C)
        timestep=timesteps.to(noisy.dtype) / 1000,
        encoder_hidden_states=text,
        txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=image_ids(h, w, noisy.device, noisy.dtype),
        attention_mask=mask,  # (B, T + N)
        return_dict=False,
    )[0]  # (B, N, 4C)
    return unpack(output, h, w)


CHROMA1_HD = dict(  # lodestones/Chroma1-HD transformer/config.json (= the class defaults)
    _class_name="ChromaTransformer2DModel",
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    axes_dims_rope=[16, 56, 56],
    approximator_num_channels=64,
    approximator_hidden_dim=5120,
    approximator_layers=5,
)

# The approximator, which ComfyUI's diffusers (Flux) name map leaves out, written under its ComfyUI names
ORIGINAL_NAMES = (
    ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
    ("distilled_guidance_layer.layers.{}.linear_1", "distilled_guidance_layer.layers.{}.in_layer"),
    ("distilled_guidance_layer.layers.{}.linear_2", "distilled_guidance_layer.layers.{}.out_layer"),
    ("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj"),
)

CHROMA = FamilyDescription(
    name="chroma",
    pipeline_class="ChromaPipeline",
    transformer_class="ChromaTransformer2DModel",
    text_encoders=("text_encoder",),
    trainable_text_encoders=(),  # T5 only: the Flux reference adapts CLIP, which Chroma does not have
    tiny_names=("tiny-chroma",),
    matches=lambda config: "approximator_num_channels" in config,
    encode_prompt=encode_prompt,
    predict=predict,
    embed_keys=("prompt_embeds", "prompt_attention_mask"),
    embed_shapes=lambda config: {
        "prompt_embeds": (512, int(config["joint_attention_dim"])),
        "prompt_attention_mask": (512,),
    },
    encoder_parameters=4762e6 + 84e6,  # T5-XXL encoder, the FLUX.1 VAE
    latent_multiple=lambda config: 2,
    latent_channels=lambda config: int(config.get("in_channels", 64)) // 4,
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=None,
    targets={"attention": ATTENTION, "attention+ff": ATTENTION + FEED_FORWARD, "all-linear": ALL_LINEAR},
    default_targets="attention+ff",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="no diffusers script trains Chroma; its parent Flux's train_dreambooth_lora_flux.py defaults "
    "(rank 4, lr 1e-4, uniform timesteps, attention + feed-forward targets, 500 steps)",
    full_precision=(r"(x_embedder|context_embedder|proj_out|distilled_guidance_layer\..*)",),
    published={"lodestones/Chroma1-HD": CHROMA1_HD, "lodestones/Chroma1-Base": CHROMA1_HD},
    single_file_renames=ORIGINAL_NAMES,  # the rest: lora_transformer_<diffusers path>
    text_tokens=lambda config: 512,  # ChromaPipeline's max_sequence_length (T5)
    image_tokens=lambda config, h, w: (h // 2) * (w // 2),
)
