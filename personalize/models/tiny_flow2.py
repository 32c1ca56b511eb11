"""Offline tiny builds of the Flux Kontext, Chroma and Flux.2 families (tiny-flux-kontext, tiny-chroma,
tiny-flux2, tiny-flux2-klein): each family's published transformer config at reduced depth, random weights.

What is real and what is reduced (so that a test trains one in seconds on a CPU):
- transformer: the published config's structure, head size (128), rotary axes, guidance input and
  channel layout; depth one double + one single block and 2 attention heads (width 256) instead of
  24-48 heads; the text width it reads (`joint_attention_dim`, `pooled_projection_dim`) is the tiny
  text encoder's;
- text encoders: the family's own classes (T5 / CLIP; Mistral3 / Qwen3 for Flux.2) built from transformers
  configs in code, one or two layers, width 32-64, with the offline tokenizers of tiny_tokenizers.py;
- VAE: an 8x-downsampling AutoencoderKL with the family's latent channels, shift and scale
  (tiny_flow._vae); Flux.2's VAE is the real AutoencoderKLFlux2 class at small width.
"""

from __future__ import annotations

from typing import Any

from personalize.models.families.flux import FLUX_DEV
from personalize.models.tiny_diffusion import _clip_text_config, _seeded, _tiny_t5_encoder
from personalize.models.tiny_flow import FLUX_VAE, _vae
from personalize.models.tiny_tokenizers import tiny_clip_tokenizer

TINY_HEADS = 2  # x the real head size 128: width 256
TINY_SIDE = 64  # default resolution of the tiny builds (like every tiny model)


def _reduced(published: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    config = {key: value for key, value in published.items() if not key.startswith("_")}
    config.update(num_layers=1, num_single_layers=1, num_attention_heads=TINY_HEADS, **overrides)
    return config


@_seeded
def tiny_flux_kontext() -> Any:
    """FluxKontextPipeline: FLUX.1-Kontext-dev's transformer config (= FLUX.1-dev's) at 1 + 1 blocks, 2 heads."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    text_encoder_2, tokenizer_2 = _tiny_t5_encoder()  # d_model 32
    transformer = FluxTransformer2DModel(**_reduced(FLUX_DEV, joint_attention_dim=32, pooled_projection_dim=32))
    pipe = FluxKontextPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),  # FLUX.1's
        vae=_vae(FLUX_DEV["in_channels"] // 4, FLUX_VAE),
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    pipe.default_sample_size = TINY_SIDE // 8  # latent side: 64 px samples and training by default
    return pipe


@_seeded
def tiny_chroma() -> Any:
    """ChromaPipeline: Chroma1-HD's transformer config at 1 + 1 blocks, 2 heads; the approximator keeps its
    real input channels (64) and 5 layers at width 64 (real 5120: 260M parameters alone)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from personalize.models.families.chroma import CHROMA1_HD

    text_encoder, tokenizer = _tiny_t5_encoder()  # d_model 32
    transformer = ChromaTransformer2DModel(**_reduced(CHROMA1_HD, joint_attention_dim=32, approximator_hidden_dim=64))
    pipe = ChromaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),  # as FLUX.1
        vae=_vae(CHROMA1_HD["in_channels"] // 4, FLUX_VAE),  # Chroma uses the FLUX.1 autoencoder
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.default_sample_size = TINY_SIDE // 8
    return pipe
