"""Tiny diffusion pipelines built in code (sizes from diffusers' own tests, REFERENCE.md).

Each builder returns a stock diffusers pipeline with random weights drawn from a fixed seed,
so that the same name gives bit-identical weights on every call and every machine. They are
what `--model tiny-sd15` (etc.) resolves to, and what every offline test runs on.
"""

from __future__ import annotations

import torch

from personalize.models.tiny_tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

CLIP_TEXT = dict(
    bos_token_id=0,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    pad_token_id=1,
    vocab_size=1000,
    hidden_act="gelu",
)


def _clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    config = dict(CLIP_TEXT)
    config.update(overrides)
    # Our tokenizer puts the specials at the end of the vocabulary; keep the config in sync.
    vocab, _ = _clip_vocab()
    config.update(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    config["pad_token_id"] = vocab["<|endoftext|>"]
    return CLIPTextConfig(**config)


def _clip_vocab():
    from personalize.models.tiny_tokenizers import clip_vocab_and_merges

    return clip_vocab_and_merges(CLIP_TEXT["vocab_size"])


def _tiny_t5_encoder():
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config), tokenizer


def _sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=32,
    )


def _sd_scheduler(**overrides):
    """SD1.x/2.x's DDIM settings (scaled-linear betas, steps offset 1)."""
    from diffusers import DDIMScheduler

    settings = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DDIMScheduler(**{**settings, **overrides})


def _sd_pipeline(unet, scheduler, text_config):
    """A StableDiffusionPipeline around a tiny UNet: the tiny VAE, then a CLIP text encoder (this order
    keeps the seeded weights of every builder as they were)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    return StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_sd_vae(),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tiny_clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _dit_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _seeded(build):
    """Run a builder under a fixed seed without disturbing the caller's RNG."""

    def wrapped():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = build()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # from_pretrained returns eval-mode modules; match it (T5 has dropout)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    wrapped.__name__ = build.__name__
    wrapped.__doc__ = build.__doc__
    return wrapped


@_seeded
def tiny_sd15():
    """SD1.x layout: one CLIP text encoder, epsilon prediction, 4 latent channels."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    return _sd_pipeline(unet, _sd_scheduler(), _clip_text_config())


@_seeded
def tiny_sd2():
    """SD2.x layout: linear projections in the transformer blocks, v-prediction."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    return _sd_pipeline(unet, _sd_scheduler(prediction_type="v_prediction"), _clip_text_config(hidden_act="gelu"))


@_seeded
def tiny_sdxl():
    """SDXL layout: two text encoders (the second with projection), text_time added embeddings."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_sd_vae(),
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection_dim=32)),
        tokenizer_2=tiny_clip_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
    )


@_seeded
def tiny_sd3():
    """SD3 layout: MMDiT transformer, two CLIP encoders with projection + T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    text_encoder_3, tokenizer_3 = _tiny_t5_encoder()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_dit_vae(latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config(projection_dim=32)),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection_dim=32)),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


@_seeded
def tiny_flux():
    """Flux layout: double + single stream blocks, CLIP pooled + T5 sequence, packed 2x2 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,  # FLUX.1-dev's layout (guidance-distilled): the one people train
    )
    text_encoder_2, tokenizer_2 = _tiny_t5_encoder()
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_dit_vae(latent_channels=1),
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
