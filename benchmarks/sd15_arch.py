"""Full-size SD1.5-architecture pipeline with random weights, for benchmarks (never for tests).

The configs are those of Stable Diffusion 1.5 (860M-parameter UNet, 84M VAE, 123M CLIP ViT-L/14
text encoder with a 49408-token embedding); the weights are random from a fixed seed, since
nothing can be downloaded here. The tokenizer is our tiny CLIP tokenizer: its ids (< 1000) are
valid rows of the full embedding, and tokenizer size does not change the cost of a step.

    python -m benchmarks.sd15_arch OUT_DIR     # save it where diffusers' scripts can load it
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )


def sd15_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    from personalize.models.tiny_tokenizers import clip_vocab_and_merges

    vocab, _ = clip_vocab_and_merges(1000)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(config)


def sd15_pipeline():
    """StableDiffusionPipeline with SD1.5 shapes and random weights (seed 0), fp32, eval mode."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from personalize.models.tiny_tokenizers import tiny_clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = StableDiffusionPipeline(
            unet=sd15_unet().eval(),
            vae=sd15_vae().eval(),
            text_encoder=sd15_text_encoder().eval(),
            tokenizer=tiny_clip_tokenizer(),
            scheduler=DDPMScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                num_train_timesteps=1000,
                steps_offset=1,
                clip_sample=False,
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe


def save_sd15_pipeline(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        sd15_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    print(save_sd15_pipeline(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/.cache/sd15-random"))
