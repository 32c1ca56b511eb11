"""Pretrain the mini DreamBench's base: a tiny Stable-Diffusion-architecture text-to-image model, from scratch, on CPU.

    python -m benchmarks.dreambench_mini.pretrain [--output DIR] [--vae-steps 1500] [--unet-steps 2500]

Three stages, all on world.py's captioned images (32 px):
1. VAE (AutoencoderKL, 2x downsampling, 4 latent channels): MSE + a small KL, on world images and on
   shapes in random colours, so that it also reconstructs colours the world's captions never name
   (the novel subjects). Then scaling_factor = 1 / std(latents), as SD does.
2. Latents of a fixed set of world images are encoded once (the VAE is frozen from here on).
3. UNet2DConditionModel + CLIP text encoder trained together (SD trains only the UNet, on a text encoder
   pretrained elsewhere; here there is no such encoder, so it learns the world's words with the UNet):
   epsilon prediction on SD's scaled-linear schedule, 10% empty captions for classifier-free guidance.

The result is a stock StableDiffusionPipeline folder (safetensors) that `--model DIR` loads.
Sizes are chosen so that the whole run takes ~30-40 minutes on a CPU core shared with other work.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.dreambench_mini import world

MAX_TOKENS = 20  # the world's longest caption is 13 tokens; short sequences keep cross-attention cheap


def build_pipeline():
    """The untrained pipeline: SD1.x layout at toy width."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    from personalize.models.tiny_diffusion import _clip_text_config
    from personalize.models.tiny_tokenizers import tiny_clip_tokenizer

    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32],
        norm_num_groups=8,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=world.SIZE,
        mid_block_add_attention=False,  # flat shapes need no global attention; saves a third of the time
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=tiny_clip_tokenizer(max_length=MAX_TOKENS),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) floats in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def vae_images(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Half world images, half shapes in random colours (never the subjects: they stay novel)."""
    return [world.world_sample(rng)[0] if rng.random() < 0.5 else world.any_colour_sample(rng) for _ in range(count)]


def train_vae(vae, steps: int, batch: int, rng: np.random.Generator, log) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        images = vae_images(rng, batch)
        pixels = to_tensor(images)  # (B, 3, 32, 32)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = torch.nn.functional.mse_loss(recon, pixels) + 1e-4 * kl
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


def finetune_decoder(vae, steps: int, batch: int, rng: np.random.Generator, log) -> None:
    """Decoder-only fine-tuning (SD's ft-MSE VAE did the same): the encoder, hence every latent the denoiser
    learned, stays as it is; the decoder learns to draw sharper edges and truer colours from them."""
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        images = vae_images(rng, batch)
        pixels = to_tensor(images)  # (B, 3, 32, 32)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, pixels)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_world(pipe, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent means, latent stds, token ids) of `count` world images; 10% of captions are empty."""
    means, stds, ids = [], [], []
    for start in range(0, count, 256):
        samples = [world.world_sample(rng) for _ in range(min(256, count - start))]
        posterior = pipe.vae.encode(to_tensor([image for image, _ in samples])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions = ["" if rng.random() < 0.1 else text for _, text in samples]
        tokens = pipe.tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        )
        ids.append(tokens.input_ids)
    return torch.cat(means), torch.cat(stds), torch.cat(ids)


def train_denoiser(pipe, latents, stds, ids, steps: int, batch: int, log, save) -> None:
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    pipe.unet.train()
    pipe.text_encoder.train()
    generator = torch.Generator().manual_seed(0)
    scale = pipe.vae.config.scaling_factor
    for step in range(steps):
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        clean = (latents[index] + stds[index] * torch.randn(latents[index].shape, generator=generator)) * scale
        noise = torch.randn(clean.shape, generator=generator)  # (B, 4, 16, 16)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        context = pipe.text_encoder(ids[index])[0]  # (B, T, 32)
        loss = torch.nn.functional.mse_loss(pipe.unet(noisy, t, context).sample, noise)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f}")
        if (step + 1) % 500 == 0:
            save(step + 1)  # a usable model early, should a long run be cut short
    pipe.unet.eval()
    pipe.text_encoder.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/.cache/dreambench-mini"))
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=12000, help="world images encoded for stage 3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decoder-steps", type=int, default=0, help="then fine-tune the VAE decoder this long")
    parser.add_argument("--decoder-only", action="store_true", help="only fine-tune the decoder of --output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.0f}s] {message}", flush=True)

    if args.decoder_only:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.output)
        finetune_decoder(pipe.vae, args.decoder_steps, args.vae_batch, rng, log)
        pipe.save_pretrained(args.output, safe_serialization=True)
        info = json.loads((args.output / "pretrain.json").read_text())
        info["decoder_steps"] = info.get("decoder_steps", 0) + args.decoder_steps
        (args.output / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
        log(f"saved {args.output} with the fine-tuned decoder")
        return
    pipe = build_pipeline()
    train_vae(pipe.vae, args.vae_steps, args.vae_batch, rng, log)
    means, stds, ids = encode_world(pipe, args.images, rng)
    pipe.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    log(f"scaling factor {pipe.vae.config.scaling_factor:.4f}")

    def save(unet_steps: int) -> None:
        pipe.save_pretrained(args.output, safe_serialization=True)
        info = {**vars(args), "output": str(args.output), "unet_steps_done": unet_steps}
        info["seconds"] = round(time.perf_counter() - start)
        (args.output / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
        log(f"saved {args.output} after {unet_steps} denoiser steps")

    train_denoiser(pipe, means, stds, ids, args.unet_steps, args.batch, log, save)
    if args.decoder_steps:
        finetune_decoder(pipe.vae, args.decoder_steps, args.vae_batch, rng, log)
    save(args.unet_steps)


if __name__ == "__main__":
    main()
