"""The recipe shared by the conditioning adapters (ControlNet, T2I-Adapter, IP-Adapter, ControlNeXt).

Reads top to bottom: resolve the config, load the frozen base, pair the images with their
conditioning (or reference) images, build the side network of the method (trainers/conditioning/controlnet.py,
t2i_adapter.py, ip_adapter.py, controlnext.py: each gives `pair`, `build`, `predict`, `save`, `restore`), run the
shared loop, then write what stock diffusers loads plus config.yaml and README.md.

Each step: z_t = add_noise(z_0, eps, t) with t uniform (cubic for T2I-Adapter), the prompt replaced
by the empty prompt with probability `conditioning.prompt_dropout`, and the MSE between the UNet's
prediction (steered by the side network) and the target of the scheduler's prediction type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError
from personalize.trainers.common.ema import EMA
from personalize.trainers.common.frozen_base import load_frozen_base, place, with_model_resolution
from personalize.trainers.common.loop import (
    BatchStream,
    LoopSettings,
    TrainState,
    cpu_threads,
    raise_if_interrupted,
    train_loop,
)
from personalize.trainers.common.optim import build_lr_scheduler, build_optimizer
from personalize.trainers.common.run import begin_training, run_metrics, start_run, write_metrics
from personalize.trainers.common.step_memory import step_memory_settings
from personalize.trainers.diffusion import losses, unet_step
from personalize.trainers.diffusion.config import TrainConfig, config_from_options, resolve
from personalize.trainers.diffusion.dreambooth import (
    TrainResult,
    _trainable,
)

RECIPES = {"controlnet": "controlnet", "t2i-adapter": "t2i_adapter", "ip-adapter": "ip_adapter"}
RECIPES["controlnext"] = "controlnext"


def cubic_timesteps(batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """t = floor((1 - u^3) T), u ~ U(0, 1): T2I-Adapter's sampling, weighted towards large (early) t. (B,)"""
    u = torch.rand(batch_size, generator=generator, device=generator.device)
    return ((1 - u**3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def drop_rows(values: torch.Tensor, replacement: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Rows of `values` (B, ...) where `drop` (B,) is True become `replacement` (1, ...) or (B, ...)."""
    mask = drop.view(-1, *([1] * (values.dim() - 1))).to(values.device)
    return torch.where(mask, replacement.to(values.dtype).expand_as(values), values)


def recipe(method: str) -> Any:
    """The module of a conditioning method (its pair/build/predict/save/restore functions)."""
    return importlib.import_module(f"personalize.trainers.conditioning.{RECIPES[method]}")


def train(config: TrainConfig | None = None, *, pipe: Any = None, **options: Any) -> TrainResult:
    """Train a ControlNet, T2I-Adapter or IP-Adapter (config.method); returns the TrainResult."""
    config, notes = resolve(config if config is not None else config_from_options(options), pipe)
    if config.method not in RECIPES:
        raise UserError(f"--method {config.method} is not a conditioning adapter; use one of {', '.join(RECIPES)}")
    method = recipe(config.method)
    unsupported = {
        "--quantize": config.quantize,
        "--train-text-encoder": config.train_text_encoder,
        "--prior-preservation": config.prior_preservation,
    }
    for flag, value in unsupported.items():
        if value:
            raise UserError(f"{flag} is for personalization methods; --method {config.method} trains a side network")
    accelerator, say, output, checkpoint_root, resume_from = start_run(config, notes)

    # --- frozen base --------------------------------------------------------------------------
    base = load_frozen_base(config, accelerator, pipe)
    config = with_model_resolution(config, base.pipe, say)
    pipe, family, device, weight_dtype = base.pipe, base.family, base.device, base.weight_dtype
    place(pipe.unet, device, weight_dtype)

    # --- paired data and the side network -----------------------------------------------------
    from personalize.data import build_dataset, build_loader

    images = build_dataset(dataclasses.replace(config.data, class_dir="", num_class_images=0), seed=config.seed)
    data = method.pair(images, config.conditioning)  # pairing errors come before any encoding
    if config.cache_latents:  # the frozen VAE and text encoders then run once per image and prompt, not per step
        from personalize.data import cache_dataset

        cached = cache_dataset(images, pipe, cache_dir=config.data.cache_dir or None, cache_text=True)
        data = method.pair(cached, config.conditioning)
    side = method.build(pipe, family, config)  # name -> module; what trains requires grad
    for module in side.values():
        module.to(device)
    named = _trainable(side)
    if not named:
        raise UserError(f"nothing to train in the {config.method}: check conditioning.controlnet_adapter / --targets")
    for param in named.values():
        param.data = param.data.float()
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for module in side.values():
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
    groups = method.param_groups(named, config.lr) if hasattr(method, "param_groups") else None
    optimizer = build_optimizer(
        config.optimizer,
        groups or [{"params": list(named.values())}],
        lr=config.lr,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )  # type: ignore[arg-type]
    lr_scheduler = build_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, config.steps)  # type: ignore[arg-type]
    prepared = accelerator.prepare(*side.values(), optimizer)
    models = dict(zip(side, prepared[:-1]))
    optimizer = prepared[-1]
    generator = torch.Generator().manual_seed(config.seed * 1_000 + accelerator.process_index)
    loader = build_loader(data, config.batch_size, seed=config.seed, shuffle=True)

    def make_loader(epoch: int) -> Any:
        loader.batch_sampler.set_epoch(epoch)
        return loader

    stream = BatchStream(make_loader, accelerator.process_index, accelerator.num_processes)
    ema = EMA(list(named.values()), config.ema_decay) if config.ema else None
    state = TrainState(named, optimizer, lr_scheduler, stream, generator, ema)
    begin_training(accelerator, state, resume_from, config, output, say)
    trainable = sum(param.numel() for param in named.values())
    say(
        f"model       {config.model} ({family})\nmethod      {config.method}, {trainable:,} trainable parameters\n"
        f"images      {len(images.report.used)} used, {len(images.report.skipped)} skipped\n"
        f"steps       {config.steps} x batch {config.batch_size} x accum {config.grad_accum}, lr {config.lr:g}\n"
        f"output      {config.output}"
    )

    # --- train --------------------------------------------------------------------------------
    from personalize.trainers.conditioning.samples import write_samples

    compute_loss = loss_function(pipe, family, method, models, config, generator, accelerator.autocast)
    autocast = accelerator.autocast if config.mixed_precision != "no" else None  # a factory: one context per use
    samples: list[Path] = []

    def validate(step: int) -> None:
        """A mid-run sample, made like the final one: the side network saved (to a scratch folder) and
        loaded back into stock pipelines; the final sample comes from the output files below."""
        if not accelerator.is_main_process or config.validation_images <= 0 or step >= config.steps:
            return
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
        with tempfile.TemporaryDirectory(dir=output) as scratch:
            with ema.swap() if ema is not None else contextlib.nullcontext():
                method.save(unwrapped, pipe, family, Path(scratch), config)
            method.restore(pipe, side)
            try:
                samples.append(write_samples(pipe, config, data, output, step, autocast, saved=Path(scratch)))
            finally:
                method.reinstall(pipe, side)

    memory = step_memory_settings(config, device, weight_dtype, frozen=[pipe.unet])
    settings = LoopSettings.from_config(config, checkpoint_root, **memory)
    started = time.perf_counter()
    for model in models.values():
        model.train()
    train_loop(accelerator, list(models.values()), compute_loss, state, settings, on_validate=validate)
    seconds = time.perf_counter() - started
    for model in models.values():
        model.eval()

    # --- outputs ------------------------------------------------------------------------------
    files: list[Path] = []
    accelerator.wait_for_everyone()
    metrics = run_metrics(state, seconds)
    if accelerator.is_main_process:
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in models.items()}
        with ema.swap() if ema is not None else contextlib.nullcontext():
            files = method.save(unwrapped, pipe, family, output, config)
    accelerator.wait_for_everyone()
    method.restore(pipe, side)
    if accelerator.is_main_process:
        from personalize.trainers.conditioning.card import render_card

        if config.validation_images > 0 and not state.stopped_early:  # with the loop's thread choice
            with cpu_threads(config.cpu_threads, [pipe.unet, *models.values()], accelerator.device):
                samples.append(write_samples(pipe, config, data, output, state.step, autocast))
        card = render_card(config, family, files, output, metrics, samples[-1] if samples else None)
        (output / "README.md").write_text(card)
        files += [output / "README.md", output / "config.yaml", write_metrics(output, metrics, state)]
        say(f"done in {seconds:.0f} s; final loss {metrics['final_loss']:.4f}; wrote:")
        for path in files + samples:
            say(f"  {path}")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    raise_if_interrupted(state, output, config.steps)
    return TrainResult(output, files, samples, metrics)


def loss_function(
    pipe: Any,
    family: str,
    method: Any,
    models: dict[str, Any],
    config: TrainConfig,
    generator: torch.Generator,
    autocast: Any = contextlib.nullcontext,
) -> Any:
    """compute_loss(batch) -> (loss, parts) for the shared loop; `autocast` runs the forward (mixed precision:
    fp32 side-network weights inside a half-precision UNet)."""
    from personalize.models.encode import encode_images, encode_text

    unet = pipe.unet
    device = next(unet.parameters()).device
    schedule = unet_step.noise_schedule(pipe.scheduler.config)
    with torch.no_grad():
        empty = encode_text(pipe, [""])  # the "unconditional" prompt of classifier-free guidance
    dropout = config.conditioning.prompt_dropout

    def compute_loss(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():  # from the latent cache, else encoded here
            if "latents" in batch:
                latents = batch["latents"].float()  # (B, C, h, w)
            else:
                latents = encode_images(pipe.vae, batch["pixels"]).float()
            if "prompt_embeds" in batch:
                embeds = {key: batch[key].to(device) for key in unet_step.TEXT_KEYS if key in batch}
            else:
                embeds = encode_text(pipe, batch["prompt"])
        size = latents.shape[0]
        drop = torch.rand(size, generator=generator) < dropout  # (B,)
        embeds = {key: drop_rows(value, empty[key], drop) for key, value in embeds.items()}
        kwargs = unet_step.unet_conditioning(family, embeds, batch, device)
        noise = losses.sample_noise(latents, config.noise_offset, generator).to(device)  # (B, C, h, w)
        if getattr(method, "TIMESTEPS", "uniform") == "cubic":
            timesteps = cubic_timesteps(size, schedule.num_train_timesteps, generator)
        else:
            timesteps = losses.sample_timesteps(size, schedule.num_train_timesteps, generator)
        timesteps = timesteps.to(device)  # (B,)
        latents = latents.to(device)
        noisy = losses.add_noise(schedule.alphas_cumprod, latents, noise, timesteps)
        dtype = next(unet.parameters()).dtype
        with autocast():
            prediction = method.predict(unet, models, noisy.to(dtype), timesteps, kwargs, batch, config, generator)
        target = losses.target_for(schedule.prediction_type, schedule.alphas_cumprod, latents, noise, timesteps)
        per_sample = losses.per_sample_mse(prediction, target)  # (B,)
        weights = None
        if config.snr_gamma > 0:
            snr = losses.snr(schedule.alphas_cumprod, timesteps)
            weights = losses.min_snr_weights(snr, config.snr_gamma, schedule.prediction_type).to(per_sample.device)
        return losses.combine(per_sample, weights)

    return compute_loss
