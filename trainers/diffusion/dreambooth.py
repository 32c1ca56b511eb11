"""DreamBooth / adapter fine-tuning of SD1.x, SD2.x and SDXL: the `personalize train` recipe.

Reads top to bottom: resolve the config, load the base, build the data (and class images for
prior preservation), cache latents and text embeddings, inject the adapter (or unfreeze the
UNet for `full`), run the shared loop, then write the adapter, samples, config.yaml and README.md.

    from personalize.trainers import train
    result = train(images="photos/cat", model="tiny-sd15", method="lora", steps=50)
    result.files, result.metrics
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError
from personalize.eval import logs
from personalize.trainers.common.ema import EMA
from personalize.trainers.common.frozen_base import (
    idle_until_validation,
    load_frozen_base,
    place,
    quantize_base,
    with_model_resolution,
)
from personalize.trainers.common.loop import (
    BatchStream,
    LoopSettings,
    TrainState,
    cpu_threads,
    needs_final_samples,
    raise_if_interrupted,
    train_loop,
)
from personalize.trainers.common.optim import build_lr_scheduler, build_optimizer
from personalize.trainers.common.run import PhaseClock, begin_training, run_metrics, start_run
from personalize.trainers.common.step_memory import step_memory_settings
from personalize.trainers.diffusion import losses, unet_step
from personalize.trainers.diffusion.config import RANKED_METHODS, TrainConfig, config_from_options, resolve


@dataclass
class TrainResult:
    output_dir: Path
    files: list[Path]
    samples: list[Path]
    metrics: dict[str, Any] = field(default_factory=dict)


def train(config: TrainConfig | None = None, *, pipe: Any = None, **options: Any) -> TrainResult:
    """Run the recipe. `options` are TrainConfig keys (data keys such as images= may be given flat).

    Pass a loaded `pipe` to train several subjects without reloading the base: adapters are
    removed from it afterwards, and a full fine-tune trains a copy of its UNet.
    """
    config, notes = resolve(config if config is not None else config_from_options(options), pipe)
    accelerator, say, output, checkpoint_root, resume_from = start_run(config, notes)
    clock = PhaseClock()

    # --- base model ---------------------------------------------------------------------------
    base = load_frozen_base(config, accelerator, pipe)
    config = with_model_resolution(config, base.pipe, say)
    pipe, own_pipe, family, device = base.pipe, base.own_pipe, base.family, base.device
    weight_dtype, text_encoders = base.weight_dtype, base.text_encoders
    clock.mark("load")

    # --- data ---------------------------------------------------------------------------------
    instance_data, class_data = _datasets(config, pipe, output, say)
    clock.mark("data")  # scanning the images, generating missing class images
    cache_text = not config.train_text_encoder  # a trained text encoder must run every step
    if config.cache_latents:
        from personalize.data import cache_dataset

        cache_dir = config.data.cache_dir or None
        instance_data = cache_dataset(instance_data, pipe, cache_dir=cache_dir, cache_text=cache_text)
        if class_data is not None:
            class_data = cache_dataset(class_data, pipe, cache_dir=cache_dir, cache_text=cache_text)
        idle_until_validation([pipe.vae, *(text_encoders.values() if cache_text else ())], device, own_pipe)
    clock.mark("cache")

    # --- model: quantize, inject / unfreeze ---------------------------------------------------
    original_unet = pipe.unet
    changes_unet = config.method == "full" or bool(config.quantize)  # a caller's UNet must stay as it was
    unet = copy.deepcopy(pipe.unet) if (changes_unet and not own_pipe) else pipe.unet
    pipe.unet = unet
    hyper = _hyperparameters(config)
    trained = {"unet": unet}
    if config.method == "full":
        place(unet, device, torch.float32).requires_grad_(True)
    else:
        from personalize import adapters

        if config.quantize:
            quantize_base(unet, config.quantize, weight_dtype, from_disk=own_pipe, device=device)
        place(unet, device, weight_dtype)
        adapters.inject(unet, config.method, targets=config.targets, name=config.adapter_name, **hyper)
        if config.train_text_encoder:
            for name, encoder in text_encoders.items():
                adapters.inject(encoder, config.method, targets="text", name=config.adapter_name, **hyper)
                trained[name] = encoder
    named = prepare_trained(trained, "unet", config)

    # --- optimizer, schedule, loop state ------------------------------------------------------
    optimizer, lr_scheduler = optimizer_and_schedule(trained, config)
    # Only the UNet is wrapped (DDP when distributed); text encoders run unwrapped inside encode_text,
    # so the loop averages their adapter gradients across processes itself.
    prepared_unet, optimizer = accelerator.prepare(unet, optimizer)
    models = [prepared_unet, *[module for name, module in trained.items() if name != "unet"]]
    unwrapped_sync = [param for name, param in named.items() if not name.startswith("unet.")]
    generator = torch.Generator().manual_seed(config.seed * 1_000 + accelerator.process_index)
    stream = _stream(instance_data, class_data, config, accelerator)
    ema = EMA(list(named.values()), config.ema_decay) if config.ema else None
    state = TrainState(named, optimizer, lr_scheduler, stream, generator, ema)
    begin_training(accelerator, state, resume_from, config, output, say)
    _summary(say, config, family, instance_data, class_data, named)

    # --- train --------------------------------------------------------------------------------
    schedule = unet_step.noise_schedule(pipe.scheduler.config)
    compute_loss = _loss_function(pipe, family, models[0], schedule, generator, config)
    prompts = config.validation_prompts or [instance_data_prompt(instance_data)]
    samples: list[Path] = []

    def validate(step: int) -> None:
        if accelerator.is_main_process and config.validation_images > 0:
            samples.append(_validate(pipe, unet, text_encoders, prompts, output, step, config, ema, accelerator))
            logs.log_image(accelerator, "samples", samples[-1], step)
            if config.cache_latents and step < config.steps:  # training goes on: the encoders idle again
                idle_until_validation([pipe.vae, *(text_encoders.values() if cache_text else ())], device, own_pipe)

    clock.mark("setup")
    started = time.perf_counter()
    memory = step_memory_settings(config, device, weight_dtype, frozen=[unet])
    settings = LoopSettings.from_config(config, checkpoint_root, average_gradients=unwrapped_sync, **memory)
    for model in models:
        model.train()
    train_loop(accelerator, models, compute_loss, state, settings, on_validate=validate)
    seconds = time.perf_counter() - started
    clock.mark("train")
    for model in models:
        model.eval()

    # --- outputs ------------------------------------------------------------------------------
    from personalize.trainers.common.finish import evaluate_output, write_run_files
    from personalize.trainers.common.model_card import render_model_card
    from personalize.trainers.common.outputs import save_outputs

    files: list[Path] = []
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the adapter first: a crash while sampling never loses it
        with ema.swap() if ema is not None else nullcontext():
            components = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
            files = save_outputs(
                output,
                method=config.method,
                family=family,
                base_model=config.model,
                components=components,
                adapter_name=config.adapter_name,
                hyper=hyper,
                resolution=config.data.resolution,
            )
        if needs_final_samples(state, samples):
            validate(state.step)
    clock.mark("save")  # the adapter files and the final samples
    metrics = {**run_metrics(state, seconds), "phases": clock.seconds}
    if accelerator.is_main_process:
        card = render_model_card(
            base_model=config.model,
            family=family,
            method=config.method,
            trigger=config.data.token,
            prompt=prompts[0],
            settings=_card_settings(config),
            files=files,
            output_dir=output,
            samples=samples,
            metrics=metrics,
            adapter={
                "hyper": hyper,
                "targets": config.targets,
                "components": list(trained),
                "name": config.adapter_name,
            },
        )
        done = f"done in {seconds:.0f} s; final loss {metrics['final_loss']:.4f}"
        files = write_run_files(output, card, files, samples, metrics, state, say, done)
    evaluate_output(accelerator, output, config, state, metrics, say)
    accelerator.wait_for_everyone()
    if not own_pipe:
        _restore_pipe(pipe, original_unet, trained, config)
    accelerator.end_training()  # closes the trackers (--report-to)
    accelerator.free_memory()
    raise_if_interrupted(state, output, config.steps)
    return TrainResult(output, files, samples, metrics)


# --- pieces of the recipe ----------------------------------------------------------------------


def prepare_trained(trained: dict[str, torch.nn.Module], denoiser: str, config: TrainConfig) -> dict[str, Any]:
    """What trains goes fp32 (whatever the base is), gets checkpointing and the attention backend; returns
    the trainable parameters by name. Shared with the flow-matching recipe (`denoiser`: "transformer")."""
    named = _trainable(trained)
    for param in named.values():
        param.data = param.data.float()
    if config.gradient_checkpointing:
        trained[denoiser].enable_gradient_checkpointing()
        for name in trained:
            if name != denoiser:
                trained[name].gradient_checkpointing_enable()
    _set_attention(trained[denoiser], config.attention)
    return named


def optimizer_and_schedule(trained: dict[str, torch.nn.Module], config: TrainConfig) -> tuple[Any, Any]:
    """The optimizer over the trained modules' parameter groups and its LR schedule."""
    optimizer = build_optimizer(
        config.optimizer,
        _param_groups(trained, config),
        lr=config.lr,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )  # type: ignore[arg-type]
    return optimizer, build_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, config.steps)  # type: ignore[arg-type]


def _datasets(config: TrainConfig, pipe: Any, output: Path, say: Any) -> tuple[Any, Any]:
    """(instance dataset, class dataset or None); generates missing class images first."""
    from personalize.data import build_dataset

    data = config.data
    instance = build_dataset(dataclasses.replace(data, class_dir="", num_class_images=0), seed=config.seed)
    if not config.prior_preservation:
        return instance, None
    from personalize.data import ensure_class_images

    class_word_prompt = data.class_prompt or (f"a photo of {data.class_word}" if data.class_word else "")
    if not class_word_prompt:
        raise UserError("--prior-preservation needs a class: pass --class-word (e.g. cat) or set data.class_prompt")
    class_dir = Path(data.class_dir) if data.class_dir else output / "class_images"
    count = data.num_class_images or (0 if data.class_dir else 100)
    if count:
        say(f"class images: {count} for '{class_word_prompt}' in {class_dir}")
        size = data.resolution
        ensure_class_images(
            pipe,
            class_word_prompt,
            class_dir,
            count,
            seed=config.seed,
            num_inference_steps=config.class_image_steps,
            height=size,
            width=size,
        )
    class_config = dataclasses.replace(
        data, images=str(class_dir), instance_prompt=class_word_prompt, class_dir="", num_class_images=0, repeats=1
    )
    return instance, build_dataset(class_config, seed=config.seed)


def instance_data_prompt(dataset: Any) -> str:
    """The instance prompt of a dataset (first item's prompt): the default validation prompt."""
    prompts = getattr(dataset, "prompts", None)  # CachedDataset
    if prompts:
        return prompts[0]
    return dataset.records[dataset.rows[0]].prompt


def _hyperparameters(config: TrainConfig) -> dict[str, Any]:
    hyper: dict[str, Any] = {}
    if config.method in RANKED_METHODS:
        hyper.update(rank=config.rank, alpha=config.alpha)
    hyper.update(config.method_options)
    return hyper


def _trainable(trained: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """'<component>.<parameter path>' -> parameter, for every parameter that requires grad."""
    return {
        f"{component}.{name}": param
        for component, module in trained.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }


def _param_groups(trained: dict[str, torch.nn.Module], config: TrainConfig) -> list[dict[str, Any]]:
    groups = []
    for component, module in trained.items():
        params = [param for param in module.parameters() if param.requires_grad]
        if not params:
            raise UserError(f"nothing to train in the {component}: --targets {config.targets!r} matched no parameter")
        group: dict[str, Any] = {"params": params}
        if component != "unet" and config.text_encoder_lr is not None:
            group["lr"] = config.text_encoder_lr
        groups.append(group)
    return groups


def _set_attention(unet: torch.nn.Module, attention: str) -> None:
    if attention == "sdpa":
        return
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise UserError("--attention xformers needs the extra: pip install 'personalize[xformers]'") from None
    if not torch.cuda.is_available():
        raise UserError("--attention xformers needs a CUDA GPU; use --attention sdpa")
    unet.enable_xformers_memory_efficient_attention()  # type: ignore[operator]


def _stream(instance: Any, classes: Any, config: TrainConfig, accelerator: Any) -> Any:
    from personalize.data import build_loader

    rank, world = accelerator.process_index, accelerator.num_processes
    streams = []
    for dataset in (instance, classes):
        if dataset is None:
            continue
        loader = build_loader(dataset, config.batch_size, seed=config.seed, shuffle=True)

        def make_loader(epoch: int, loader: Any = loader) -> Any:
            loader.batch_sampler.set_epoch(epoch)
            return loader

        streams.append(BatchStream(make_loader, rank, world))
    return streams[0] if len(streams) == 1 else PairedStream(*streams)


class PairedStream:
    """Instance batches zipped with class batches (prior preservation); resumes both positions."""

    def __init__(self, instance: BatchStream, classes: BatchStream) -> None:
        self.streams = (instance, classes)

    @property
    def consumed(self) -> list[int]:
        return [stream.consumed for stream in self.streams]

    @consumed.setter
    def consumed(self, values: list[int]) -> None:
        for stream, value in zip(self.streams, values):
            stream.consumed = int(value)

    def __iter__(self) -> Any:
        for instance, classes in zip(*self.streams):
            classes = {**classes, "is_class": torch.ones(len(classes["is_class"]), dtype=torch.bool)}
            yield [instance, classes]


def _loss_function(
    pipe: Any,
    family: str,
    unet: torch.nn.Module,
    schedule: unet_step.NoiseSchedule,
    generator: torch.Generator,
    config: TrainConfig,
) -> Any:
    from personalize.models.encode import encode_images, encode_text

    device = next(unet.parameters()).device

    def encode(batch: dict[str, Any]) -> dict[str, Any]:
        """Fill in what the cache did not provide: latents from pixels, embeddings from prompts."""
        batch = dict(batch)
        if "latents" not in batch:
            with torch.no_grad():
                batch["latents"] = encode_images(pipe.vae, batch["pixels"]).float()  # (B, C, h, w)
        if "prompt_embeds" not in batch:
            with torch.enable_grad() if config.train_text_encoder else torch.no_grad():
                batch.update(encode_text(pipe, batch["prompt"]))
        return batch

    def compute_loss(batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        batches = [encode(item) for item in (batch if isinstance(batch, list) else [batch])]
        per_sample, weights, is_class = [], [], []
        for group in unet_step.concat_batches([_tensors_only(item) for item in batches]):
            latents = group["latents"].to(device, dtype=torch.float32)  # (B, C, h, w)
            conditioning = unet_step.unet_conditioning(family, group, group, device)
            values, snr_weights = unet_step.per_sample_loss(
                unet,
                latents,
                conditioning,
                schedule,
                generator,
                noise_offset=config.noise_offset,
                snr_gamma=config.snr_gamma,
                mask=group.get("mask"),
            )
            per_sample.append(values)
            weights.append(snr_weights if snr_weights is not None else torch.ones_like(values))
            is_class.append(group["is_class"].to(device))
        return losses.combine(
            torch.cat(per_sample), torch.cat(weights), torch.cat(is_class), prior_weight=config.prior_loss_weight
        )

    return compute_loss


def _tensors_only(batch: dict[str, Any]) -> dict[str, Any]:
    keep = ("latents", "is_class", "mask", "original_size", "crop_top_left", "target_size", *unet_step.TEXT_KEYS)
    return {key: batch[key] for key in keep if key in batch}


def _validate(
    pipe: Any,
    unet: torch.nn.Module,
    text_encoders: dict[str, torch.nn.Module],
    prompts: list[str],
    output: Path,
    step: int,
    config: TrainConfig,
    ema: EMA | None,
    accelerator: Any,
    extra: dict[str, Any] | None = None,
) -> Path:
    from personalize.trainers.common.validation import sample_grid

    device = accelerator.device
    pipe.vae.to(device)
    for encoder in text_encoders.values():
        encoder.to(device)
    was_training = unet.training
    unet.eval()
    for module in unet.modules():
        # bitsandbytes repacks 4-bit weights for CPU inference in eval mode (and cannot for layers narrower
        # than its block size); training mode keeps the layout the training steps use.
        if type(module).__name__ == "Linear4bit":
            module.train()
    autocast = accelerator.autocast if config.mixed_precision != "no" else None  # a factory: one context per use
    # the loop's thread choice also for the end-of-run grid, drawn after the loop has restored torch's default
    threads = cpu_threads(config.cpu_threads, [unet], device)
    with threads, ema.swap() if ema is not None else nullcontext():
        path = sample_grid(
            pipe,
            prompts,
            output / "samples",
            step,
            seed=config.seed,
            images_per_prompt=config.validation_images,
            steps=config.validation_steps,
            size=config.data.resolution,
            autocast=autocast,
            extra={**(extra or {}), **({"num_frames": config.data.frames} if config.data.frames else {})},
            fps=config.data.fps or 16.0,  # video models sample clips of the training length
        )
    unet.train(was_training)
    return path


def _summary(
    say: Any,
    config: TrainConfig,
    family: str,
    instance: Any,
    classes: Any,
    named: dict[str, torch.nn.Parameter],
) -> None:
    used, skipped = len(instance.report.used), len(instance.report.skipped)
    trainable = sum(param.numel() for param in named.values())
    lines = [
        f"model       {config.model} ({family})",
        f"method      {config.method}"
        + (f" rank {config.rank} alpha {config.alpha}" if config.method in RANKED_METHODS else "")
        + (f" on {config.targets}" if config.method != "full" else "")
        + (f", base quantized {config.quantize}" if config.quantize else ""),
        f"trainable   {trainable:,} parameters",
        f"images      {used} used, {skipped} skipped"
        + (f"; {len(classes)} class images" if classes is not None else ""),
        f"prompt      {instance_data_prompt(instance)}",
        f"steps       {config.steps} x batch {config.batch_size} x accum {config.grad_accum}, lr {config.lr:g}",
        f"output      {config.output}",
    ]
    say("\n".join(lines))


def _card_settings(config: TrainConfig) -> dict[str, Any]:
    keys = ("method", "rank", "alpha", "targets", "steps", "lr", "lr_scheduler", "batch_size", "grad_accum")
    keys += ("mixed_precision", "optimizer", "quantize", "snr_gamma", "noise_offset", "prior_preservation", "seed")
    settings = {key: getattr(config, key) for key in keys}
    settings.update(resolution=config.data.resolution, method_options=config.method_options or "")
    return settings


def _restore_pipe(
    pipe: Any, original: torch.nn.Module, trained: dict[str, torch.nn.Module], config: Any, denoiser: str = "unet"
) -> None:
    """Leave a caller's pipeline as it was: put back its denoiser (`pipe.unet` / `pipe.transformer`, when a copy
    trained), remove adapters. Shared with the flow-matching recipe."""
    from personalize import adapters

    for name, module in trained.items():
        if name == denoiser and module is not original:
            setattr(pipe, denoiser, original)
        elif config.method != "full":
            adapters.remove(module, config.adapter_name)
