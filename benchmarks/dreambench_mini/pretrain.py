"""Pretrain the mini DreamBench's base: a tiny Stable-Diffusion-architecture text-to-image model, from scratch, on CPU.

    python -m benchmarks.dreambench_mini.pretrain [--output DIR] [--vae-steps 200] [--unet-steps 1000]
        [--batch 32] [--probe-every 100]

Built to learn prompt following fast on one shared CPU core (an earlier 32 px design with a 2x VAE and a
batch of 16 drew the same image for every prompt after 2400 steps):
1. VAE (AutoencoderKL with one block: no downsampling, 4 latent channels) on world images and on shapes in
   random colours, so that it also reconstructs colours the world's captions never name (the novel
   subjects). A 1x VAE is nearly per-pixel: it reaches a near-exact reconstruction in a few hundred steps.
   Then scaling_factor = 1 / std(latents), as SD does; the VAE is frozen from here on.
2. Latents of a fixed set of world images are encoded once.
3. UNet2DConditionModel (cross-attention at both levels) + a small CLIP text encoder trained together (SD
   trains only the UNet, on a text encoder pretrained elsewhere; here there is none, so the encoder learns
   the world's words with the UNet): epsilon prediction on SD's scaled-linear schedule, large batches,
   10% empty captions for classifier-free guidance, and an exponential moving average (EMA) of the
   weights, which is what gets saved. Every --probe-every steps the EMA model draws a fixed set of prompts
   and measures.py reads shape, colour and context off the pixels, so the log shows prompt following
   emerge (or not).

The run can be stopped and continued: the training state (weights, EMA, optimizer) is saved next to the
model at every probe and picked up again by the same command. The result is a stock
StableDiffusionPipeline folder (safetensors) that `--model DIR` loads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.dreambench_mini import measures, world

MAX_TOKENS = 16  # the world's longest caption is 10 tokens; short sequences keep cross-attention cheap
STATE = "train_state.safetensors"


def build_pipeline():
    """The untrained pipeline: SD1.x layout at toy width, a VAE that does not downsample."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from personalize.models.tiny_diffusion import _clip_text_config
    from personalize.models.tiny_tokenizers import tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=world.SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        # Cross-attention at 8 x 8 and in the middle block only: self-attention over 16 x 16 tokens would
        # cost 2.5x the whole step on a CPU, and the world's objects are big enough to place at 8 x 8.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers reads it as the number of heads
        norm_num_groups=16,
        # The prompt, attention-pooled, is also added to the timestep embedding (a stock diffusers option,
        # Kandinsky's "text" addition embedding): every ResNet block then sees the colours and the context
        # the prompt names, which is what lets prompt following emerge within a CPU budget.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[32],
        norm_num_groups=8,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=world.SIZE,
        mid_block_add_attention=False,  # flat shapes need no global attention in the codec
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    text = _clip_text_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text),
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


def vae_images(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Half world images, half shapes in random colours (never the subjects' scenes: they stay novel)."""
    return [world.world_sample(rng)[0] if rng.random() < 0.5 else world.any_colour_sample(rng) for _ in range(count)]


def train_vae(vae, steps: int, batch: int, rng: np.random.Generator, log) -> None:
    """MSE reconstruction + a tiny KL term (SD's VAE also keeps its KL weight at ~1e-6)."""
    with torch.no_grad():  # start the posterior narrow (std ~0.02): it learns as a plain autoencoder at once
        vae.quant_conv.bias[vae.config.latent_channels :] -= 8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        pixels = to_tensor(vae_images(rng, batch))  # (B, 3, 16, 16)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / pixels[0].numel()
        loss = torch.nn.functional.mse_loss(recon, pixels) + 1e-5 * kl
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 30) * (0.1 if step > 0.8 * steps else 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def vae_check(vae, rng: np.random.Generator) -> dict[str, float]:
    """Share of world images (and subject photos) whose reconstruction parses like the original."""
    images = [world.world_sample(rng)[0] for _ in range(64)]
    photos = [photo for subject in world.SUBJECTS for photo in world.subject_images(subject, count=5)]
    out = vae.decode(vae.encode(to_tensor(images + photos)).latent_dist.mean).sample
    recon = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    read = [(measures.parse(a), measures.parse(b)) for a, b in zip(images, recon[: len(images)])]
    same = [(a.context, a.shape, a.colour) == (b.context, b.shape, b.colour) for a, b in read]
    kept = [measures.parse(b).subject is not None for b in recon[len(images) :]]
    return {"world_parse_kept": float(np.mean(same)), "subject_kept": float(np.mean(kept))}


@torch.no_grad()
def encode_world(pipe, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(latent means, latent stds, captions) of `count` world images."""
    means, stds, captions = [], [], []
    for start in range(0, count, 512):
        samples = [world.world_sample(rng) for _ in range(min(512, count - start))]
        posterior = pipe.vae.encode(to_tensor([image for image, _ in samples])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += [text for _, text in samples]
    return torch.cat(means), torch.cat(stds), captions


PROBE = [  # (shape, colour, context): every shape, colour and context at least twice
    ("ball", "red", "on the grass"),
    ("box", "blue", "in the snow"),
    ("cone", "yellow", "at night"),
    ("ball", "purple", "on the beach"),
    ("box", "red", "in the sky"),
    ("cone", "blue", "in a room"),
    ("ball", "yellow", "in the snow"),
    ("box", "purple", "at night"),
    ("cone", "red", "on the beach"),
    ("ball", "blue", "in the sky"),
    ("box", "yellow", "on the grass"),
    ("cone", "purple", "in a room"),
]
PROBE_TWO_TONE = [  # (shape, upper colour, lower colour, context): two-coloured objects, the subjects' pairs on
    ("cone", "yellow", "purple", "on the grass"),  # other shapes among them
    ("box", "red", "blue", "at night"),
    ("ball", "blue", "yellow", "in the snow"),
    ("cone", "blue", "yellow", "on the beach"),
    ("box", "yellow", "purple", "in the sky"),
    ("ball", "purple", "red", "in a room"),
]


@torch.no_grad()
def probe(pipe, seeds: int = 2, steps: int = 15, guidance: float = 4.0) -> tuple[dict[str, float], np.ndarray]:
    """Prompt following of the current model: shares of PROBE images with the asked shape, colour, context."""
    asked = [(shape, colour, colour, context) for shape, colour, context in PROBE] + PROBE_TWO_TONE
    prompts = [
        f"a photo of a {upper if upper == lower else f'{upper} and {lower}'} {shape} {context}"
        for shape, upper, lower, context in asked
    ]
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        prompts * seeds, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np"
    ).images  # (P * seeds, 16, 16, 3) floats in [0, 1]
    images = (images * 255).round().astype(np.uint8)
    hits = {"shape": [], "colour": [], "context": [], "all": [], "two_tone": []}
    for image, (shape, upper, lower, context) in zip(images, asked * seeds):
        parsed = measures.parse(image)
        if upper != lower:  # the pair, in its order: what a subject needs the base to be able to draw
            hits["two_tone"].append(parsed.upper == upper and parsed.lower == lower)
            continue
        right = {
            "shape": parsed.shape == shape,
            "colour": parsed.colour == upper,
            "context": parsed.context == context,
        }
        for key, value in right.items():
            hits[key].append(value)
        hits["all"].append(all(right.values()))
    grid = np.concatenate(
        [np.concatenate(list(images[s * len(asked) : (s + 1) * len(asked)]), 1) for s in range(seeds)]
    )
    return {key: float(np.mean(values)) for key, values in hits.items()}, grid


def save_grid(grid: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST).save(path)


class Ema:
    """w_ema <- d * w_ema + (1 - d) * w, with d = min(decay, (1 + step) / (10 + step)) (warm-up as in diffusers)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {
            f"{name}.{key}": value.detach().clone()
            for name, module in modules.items()
            for key, value in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in modules.items():
            for key, value in module.state_dict().items():
                shadow = self.shadow[f"{name}.{key}"]
                if value.dtype.is_floating_point:
                    shadow.lerp_(value, 1 - decay)
                else:
                    shadow.copy_(value)

    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict(
                {key[len(prefix) :]: value for key, value in self.shadow.items() if key.startswith(prefix)}
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/.cache/dreambench-mini"))
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument(
        "--unet-steps", type=int, default=4000, help="total denoiser steps (a continued run counts the old ones)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=12000, help="world images encoded for stage 3")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the UNet (warm-up, then constant)")
    parser.add_argument("--text-lr", type=float, default=3e-3, help="learning rate of the text encoder")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--noise-offset", type=float, default=0.15)
    parser.add_argument("--high-noise-weight", type=float, default=5.0, help="cap of the 1 / alpha_bar loss weight")
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.output.mkdir(parents=True, exist_ok=True)
    log_file = (args.output / "pretrain.log").open("a")

    def log(message: str) -> None:
        line = f"[{time.perf_counter() - start:7.0f}s] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    state_path = args.output / STATE
    resumed = state_path.is_file()
    if resumed:  # the VAE, its scaling factor and the tokenizer come back with the saved pipeline
        pipe = StableDiffusionPipeline.from_pretrained(args.output, torch_dtype=torch.float32)
        info = json.loads((args.output / "pretrain.json").read_text())
        log(f"continuing {args.output} from denoiser step {info['unet_steps_done']}")
    else:
        pipe = build_pipeline()
        rng = np.random.default_rng(0)
        train_vae(pipe.vae, args.vae_steps, args.vae_batch, rng, log)
        info = {"vae_steps": args.vae_steps, "unet_steps_done": 0, "probes": [], "seconds": 0}
        info["vae_check"] = vae_check(pipe.vae, np.random.default_rng(99))
        log(f"vae check {info['vae_check']}")
    pipe.set_progress_bar_config(disable=True)
    done = info["unet_steps_done"]
    session = {"from_step": done, "noise_offset": args.noise_offset, "high_noise_weight": args.high_noise_weight}
    info.setdefault("sessions", []).append(session)  # the settings of each (continued) run, in pretrain.json
    cache = args.output / "latents.safetensors"
    if resumed and cache.is_file():  # the same VAE: the latents of the first session still hold
        saved = load_file(cache)
        means, stds = saved["means"], saved["stds"]
        captions = json.loads((args.output / "captions.json").read_text())
    else:
        means, stds, captions = encode_world(pipe, args.images, np.random.default_rng(1 + done))
        save_file({"means": means.contiguous(), "stds": stds.contiguous()}, cache)
        (args.output / "captions.json").write_text(json.dumps(captions))
    if not resumed:
        pipe.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        log(f"scaling factor {pipe.vae.config.scaling_factor:.4f}")
    ids = pipe.tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    empty = pipe.tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids  # (1, T)

    unet, text_encoder = pipe.unet, pipe.text_encoder
    modules = {"unet": unet, "text_encoder": text_encoder}
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": args.lr},
            {"params": list(text_encoder.parameters()), "lr": args.text_lr},
        ],
        weight_decay=0.0,
    )
    ema = Ema(modules, args.ema)
    if resumed:  # raw weights and EMA; the optimizer restarts (a short warm-up covers its empty moments)
        saved = load_file(state_path)
        for name, module in modules.items():
            module.load_state_dict(
                {key[len(name) + 5 :]: value for key, value in saved.items() if key.startswith(f"raw.{name}.")}
            )
        ema.shadow = {key[4:]: value for key, value in saved.items() if key.startswith("ema.")}
    peaks = [group["lr"] for group in optimizer.param_groups]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(done)
    scale = pipe.vae.config.scaling_factor
    seconds_before = info.get("seconds", 0)

    def snapshot(step: int) -> None:
        """Save the raw and EMA weights (to continue) and the EMA pipeline (to use); probe it."""
        tensors = {
            f"raw.{name}.{key}": value.contiguous()
            for name, module in modules.items()
            for key, value in module.state_dict().items()
        }
        tensors.update({f"ema.{key}": value.contiguous() for key, value in ema.shadow.items()})
        raw = {
            name: {key: value.clone() for key, value in module.state_dict().items()} for name, module in modules.items()
        }
        ema.copy_to(modules)
        unet.eval(), text_encoder.eval()
        figures, grid = probe(pipe)
        save_grid(grid, args.output / "probe.png")
        pipe.save_pretrained(args.output, safe_serialization=True)
        for name, module in modules.items():
            module.load_state_dict(raw[name])
        save_file(tensors, state_path)
        info["unet_steps_done"] = step
        info["probes"].append({"step": step, **figures})
        info["seconds"] = seconds_before + round(time.perf_counter() - start)  # wall time of every session
        info.update(batch=args.batch, lr=args.lr, text_lr=args.text_lr, ema=args.ema, images=args.images)
        (args.output / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
        log(f"step {step}: probe (EMA) {figures}; saved {args.output}")

    for step in range(done, args.unet_steps):
        unet.train(), text_encoder.train()
        index = torch.randint(0, len(means), (args.batch,), generator=generator)
        clean = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scale
        noise = torch.randn(clean.shape, generator=generator)  # (B, 4, 16, 16)
        # Offset noise (Guttenberg 2023): SD's schedule leaves ~7% of the image in x_T, so a plain model takes
        # the background's colour from x_t instead of from the prompt; a random per-channel offset hides it.
        noise = noise + args.noise_offset * torch.randn((args.batch, clean.shape[1], 1, 1), generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        tokens = ids[index].clone()  # (B, T)
        dropped = torch.rand(args.batch, generator=generator) < 0.1  # classifier-free guidance's empty prompt
        tokens[dropped] = empty
        context = text_encoder(tokens)[0]  # (B, T, 64)
        # High-noise steps decide the layout and colours, i.e. what the prompt says: weight each sample's
        # epsilon-MSE by min(1 / alpha_bar_t, 5) (x0-error weighting, clamped), normalized over the batch.
        error = (unet(noisy, t, context).sample - noise).square().mean(dim=(1, 2, 3))  # (B,)
        weight = (1.0 / noise_scheduler.alphas_cumprod[t]).clamp(max=args.high_noise_weight)  # (B,)
        loss = (weight * error).sum() / weight.sum()
        warm = min(1.0, (step - done + 1) / 100)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * warm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        optimizer.step()
        ema.update(modules, step)
        if step % 50 == 0:
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f}")
        if (step + 1) % args.probe_every == 0 or step + 1 == args.unet_steps:
            snapshot(step + 1)


if __name__ == "__main__":
    main()
