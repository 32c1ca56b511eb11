"""SD3 / Flux architectures from their published configs at reduced depth, random weights, built in code.

For the memory planner's check and the benchmarks: the transformer keeps the real width (heads, head size,
text and pooled widths; personalize.models.families.*.published) with only `layers` (+ `single_layers`)
blocks, or any other width given as overrides; the text encoders are one-layer stand-ins that produce the
embedding widths the transformer takes (a T5 with d_model = joint_attention_dim, CLIP(s) whose pooled
outputs add up to pooled_projection_dim), and the VAE is a small 8x one with the family's latent channels,
shift and scale. The pipelines are stock diffusers pipelines; `save_pretrained` + `from_pretrained` reload them.

    pipe = reduced_flux(layers=1, single_layers=1)  # FLUX.1-dev width: 24 heads x 128, T5 width 4096
    pipe = reduced_sd3(layers=2, variant="stabilityai/stable-diffusion-3.5-medium")
"""

from __future__ import annotations

from typing import Any

from personalize.models.families import FLOW_FAMILIES
from personalize.models.tiny_diffusion import _clip_text_config, _seeded
from personalize.models.tiny_tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

FLUX_VAE = {"shift_factor": 0.1159, "scaling_factor": 0.3611}  # FLUX.1 autoencoder (ae_params)
SD3_VAE = {"shift_factor": 0.0609, "scaling_factor": 1.5305}  # SD3 / SD3.5 autoencoder


def _vae(latent_channels: int, scale: dict[str, float]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 32, 32, 32],  # four blocks: 8x down, as the real VAEs
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        **scale,
    )


def _t5(width: int, max_length: int, d_kv: int = 16, umt5: bool = False) -> tuple[Any, Any]:
    """A 1-layer T5 encoder (or UMT5, Wan's) of `width` and its tokenizer."""
    import transformers

    prefix = "UMT5" if umt5 else "T5"
    config_class, model_class = getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}EncoderModel")
    tokenizer = tiny_t5_tokenizer(max_length)
    config = config_class(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=d_kv,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_class(config), tokenizer


def _clip(hidden: int, projection: int | None = None) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _clip_text_config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    if projection is None:
        return CLIPTextModel(config)
    config.projection_dim = projection
    return CLIPTextModelWithProjection(config)


def reduced_flux(layers: int = 1, single_layers: int = 1, **overrides: Any) -> Any:
    """A FluxPipeline with FLUX.1-dev's transformer config at `layers` + `single_layers` blocks."""

    @_seeded
    def build() -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        config = {**FLOW_FAMILIES["flux"].published["black-forest-labs/FLUX.1-dev"], **overrides}
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config.update(num_layers=layers, num_single_layers=single_layers)
        transformer = FluxTransformer2DModel(**config)
        text_encoder_2, tokenizer_2 = _t5(config["joint_attention_dim"], 512)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # FLUX.1-dev's
        return FluxPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=_vae(config["in_channels"] // 4, FLUX_VAE),
            text_encoder=_clip(config["pooled_projection_dim"]),
            tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )

    return build()


def reduced_sd3(layers: int = 2, variant: str = "stabilityai/stable-diffusion-3.5-medium", **overrides: Any) -> Any:
    """A StableDiffusion3Pipeline with `variant`'s transformer config at `layers` blocks."""

    @_seeded
    def build() -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        config = {**FLOW_FAMILIES["sd3"].published[variant], **overrides}
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        config["num_layers"] = layers
        config["dual_attention_layers"] = tuple(i for i in config.get("dual_attention_layers", ()) if i < layers)
        transformer = SD3Transformer2DModel(**config)
        pooled = config["pooled_projection_dim"]  # CLIP-L + CLIP-G pooled widths add up to it (768 + 1280)
        first = pooled * 3 // 8
        text_encoder_3, tokenizer_3 = _t5(config["joint_attention_dim"], 256)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's
            vae=_vae(config["in_channels"], SD3_VAE),
            text_encoder=_clip(first, projection=first),
            tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=_clip(pooled - first, projection=pooled - first),
            tokenizer_2=tiny_clip_tokenizer(),
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )

    return build()
