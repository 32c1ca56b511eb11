"""Offline tiny builds of the Flux Kontext, Chroma and Flux.2 families (tiny-flux-kontext, tiny-chroma,
tiny-flux2, tiny-flux2-klein): each family's published transformer config at reduced depth, random weights.

What is real and what is reduced (so that a test trains one in seconds on a CPU):
- transformer: the published config's structure, head size (128), rotary axes, guidance input and
  channel layout; depth one double + one single block and 2 attention heads (width 256) instead of
  24-48 heads; the text width it reads (`joint_attention_dim`, `pooled_projection_dim`) is the tiny
  text encoder's;
- text encoders: the family's own classes built from transformers configs in code at width 32: T5 / CLIP
  stand-ins with one or two layers (Chroma, Kontext), a Mistral3 with the 30 decoder layers Flux2Pipeline
  reads and a Qwen3 with the 27 layers Flux2KleinPipeline reads, with the offline tokenizers of
  tiny_tokenizers.py (a small chat template for the last two);
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


def _reduced(published: dict[str, Any], heads: int, **overrides: Any) -> dict[str, Any]:
    config = {key: value for key, value in published.items() if not key.startswith("_")}
    config.update(num_layers=1, num_single_layers=1, num_attention_heads=heads, **overrides)
    return config


def reduced_pipeline(name: str, heads: int = TINY_HEADS) -> Any:
    """The tiny build `name` with `heads` attention heads of the real size 128 (width 128 x heads): the
    planner check trains wider ones (tests/trainers/test_image_families.py)."""
    builders = {
        "tiny-flux-kontext": _flux_kontext,
        "tiny-chroma": _chroma,
        "tiny-flux2": _flux2,
        "tiny-flux2-klein": _flux2_klein,
    }
    return _seeded(lambda: builders[name](heads))()


def tiny_flux_kontext() -> Any:
    """FluxKontextPipeline: FLUX.1-Kontext-dev's transformer config (= FLUX.1-dev's) at 1 + 1 blocks, 2 heads."""
    return reduced_pipeline("tiny-flux-kontext")


def tiny_chroma() -> Any:
    """ChromaPipeline: Chroma1-HD's transformer config at 1 + 1 blocks, 2 heads; the approximator keeps its
    real input channels (64) and 5 layers at width 64 (real 5120: 260M parameters alone)."""
    return reduced_pipeline("tiny-chroma")


def tiny_flux2() -> Any:
    """Flux2Pipeline: FLUX.2-dev's transformer config at 1 + 1 blocks, 2 heads; a Mistral3 text encoder with
    the 30 decoder layers the pipeline reads (10, 20, 30) at width 32 and a one-layer Pixtral vision tower."""
    return reduced_pipeline("tiny-flux2")


def tiny_flux2_klein() -> Any:
    """Flux2KleinPipeline: FLUX.2-klein-4B's transformer config at 1 + 1 blocks, 2 heads; a Qwen3 text encoder
    with the 27 layers the pipeline reads (9, 18, 27) at width 32."""
    return reduced_pipeline("tiny-flux2-klein")


def _flux_kontext(heads: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    text_encoder_2, tokenizer_2 = _tiny_t5_encoder()  # d_model 32
    transformer = FluxTransformer2DModel(**_reduced(FLUX_DEV, heads, joint_attention_dim=32, pooled_projection_dim=32))
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


def _chroma(heads: int) -> Any:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from personalize.models.families.chroma import CHROMA1_HD

    text_encoder, tokenizer = _tiny_t5_encoder()  # d_model 32
    transformer = ChromaTransformer2DModel(
        **_reduced(CHROMA1_HD, heads, joint_attention_dim=32, approximator_hidden_dim=64)
    )
    pipe = ChromaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),  # as FLUX.1
        vae=_vae(CHROMA1_HD["in_channels"] // 4, FLUX_VAE),  # Chroma uses the FLUX.1 autoencoder
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.default_sample_size = TINY_SIDE // 8
    return pipe


# A chat template for the tiny Mistral / Qwen3 stand-ins: role markers around each turn's text, whether the
# content is a string (Flux2KleinPipeline) or a list of {"type": "text"} parts (Flux2Pipeline's format_input).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEXT_WIDTH = 32  # hidden size of the tiny text encoders: the transformer reads 3 x 32 per token


def _flux2_vae() -> Any:
    """AutoencoderKLFlux2 at small width: 8x down, 32 latent channels, batch-norm statistics over 2x2 patches
    (set away from 0 / 1 so that the normalization is exercised)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.num_features) + 0.5)
    return vae


def _chat_tokenizer() -> Any:
    from personalize.models.tiny_tokenizers import tiny_llama_tokenizer

    tokenizer = tiny_llama_tokenizer(max_length=512)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _flux2_transformer(published: dict[str, Any], heads: int) -> Any:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(**_reduced(published, heads, joint_attention_dim=3 * TEXT_WIDTH))


def _flux2(heads: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from personalize.models.families.flux2 import FLUX2_DEV

    tokenizer = _chat_tokenizer()
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=30,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision))
    pipe = Flux2Pipeline(
        transformer=_flux2_transformer(FLUX2_DEV, heads),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_flux2_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
    )
    pipe.default_sample_size = TINY_SIDE // 8
    return pipe


def _flux2_klein(heads: int) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from personalize.models.families.flux2_klein import KLEIN_4B

    tokenizer = _chat_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=27,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = Flux2KleinPipeline(
        transformer=_flux2_transformer(KLEIN_4B, heads),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_flux2_vae(),
        text_encoder=Qwen3ForCausalLM(config),
        tokenizer=tokenizer,
    )
    pipe.default_sample_size = TINY_SIDE // 8
    return pipe
