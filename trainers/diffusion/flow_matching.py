"""Flow-matching DiT personalization (SD3 / SD3.5, Flux.1, Wan T2V): the `personalize train` recipe for those models.

Reads top to bottom like dreambooth.py: resolve the config (with the family's defaults), load the base,
check what the model can take, build the data (class images for prior preservation), cache latents and
text embeddings (the VAE and text encoders then leave the device), quantize / inject / unfreeze the
transformer, run the shared loop, then write the adapter, samples, config.yaml and README.md.
Everything that differs per family comes from its description (personalize.models.families). Video
families (a description with `clip`) train on clips: latents (B, C, F, h, w), `data.frames` / `data.fps`.
The edit task (`edit.sources` set: `--task edit --control DIR`) trains the same way on (source, target,
instruction) triples: the source's latents go to the family's `predict_edit` as clean reference tokens.

    from personalize.trainers import train
    result = train(images="photos/cat", model="tiny-flux", method="lora", steps=50, resolution=32)
    train(images="targets", edit={"sources": "sources"}, model="tiny-flux-kontext", resolution=64)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError
from personalize.eval import logs
from personalize.models.families import FamilyDescription, transformer_config
from personalize.models.families.description import Embeds, stack_rows
from personalize.trainers.common.ema import EMA
from personalize.trainers.common.finish import evaluate_output, write_run_files
from personalize.trainers.common.frozen_base import idle_until_validation, place, with_model_resolution
from personalize.trainers.common.loop import (
    LoopSettings,
    TrainState,
    needs_final_samples,
    raise_if_interrupted,
    train_loop,
)
from personalize.trainers.common.run import DTYPES, begin_training, run_metrics, start_run
from personalize.trainers.common.step_memory import step_memory_settings
from personalize.trainers.diffusion import flow_step, losses, unet_step
from personalize.trainers.diffusion.config import RANKED_METHODS, TrainConfig, config_from_options, resolve
from personalize.trainers.diffusion.dreambooth import (
    TrainResult,
    _card_settings,
    _datasets,
    _hyperparameters,
    _restore_pipe,
    _stream,
    _summary,
    _validate,
    instance_data_prompt,
    optimizer_and_schedule,
    prepare_trained,
)

FLOW_METHODS = ("lora", "dora", "loha", "lokr", "krona", "ia3", "full")


def train(config: TrainConfig | None = None, *, pipe: Any = None, **options: Any) -> TrainResult:
    """Run the recipe; `options` are TrainConfig keys (data keys flat). A passed `pipe` is left as it was."""
    config = config if config is not None else config_from_options(options)
    family = _family(config, pipe)
    config, notes = resolve(with_family_defaults(config, family), pipe)
    _check_method(config, family)
    _check_text_encoder(config, family)
    _check_edit(config, family)
    caveat = _check_distilled(
        config, family, pipe.transformer.config if pipe is not None else transformer_config(config.model)
    )
    if caveat:
        notes.append(caveat.split(";")[0])
    if config.vram:
        from personalize.plan import apply_vram

        config, applied = apply_vram(config, family)
        notes.append(f"--vram {config.vram}: {applied}")
    accelerator, say, output, checkpoint_root, resume_from = start_run(config, notes)

    # --- base model ---------------------------------------------------------------------------
    own_pipe = pipe is None
    if own_pipe:
        from personalize.models import load_pipeline

        pipe = load_pipeline(config.model, torch_dtype=torch.float32, allow_pickle=config.allow_pickle)
    device, weight_dtype = accelerator.device, DTYPES[config.mixed_precision]
    config = _check_model(with_model_resolution(_family_resolution(config, family), pipe, say), family, pipe, say)
    text_encoders = {name: getattr(pipe, name) for name in family.text_encoders if getattr(pipe, name, None)}
    for module in (pipe.transformer, pipe.vae, *text_encoders.values()):
        module.requires_grad_(False)
    place(pipe.vae, device, torch.float32)
    for encoder in text_encoders.values():
        place(encoder, device, weight_dtype)

    # --- data: cache latents and embeddings once, then the encoders leave the device -----------
    instance_data, class_data = _datasets(config, pipe, output, say)
    edit = config.edit.sources
    if edit:  # pairs and instructions are checked before anything is encoded
        from personalize.data.edit import match_sources, read_instructions, with_instructions

        source_files = match_sources(instance_data, edit)
        if config.edit.instructions:
            instructions = read_instructions(config.edit.instructions)
            instance_data = with_instructions(instance_data, instructions, config.data.token, config.edit.instructions)
    # a trained text encoder must run every step; one that reads the edit's source picture runs once per source crop
    cache_text = not config.train_text_encoder and not (edit and family.encode_edit_prompt)
    # an edit run keeps the VAE: each source crop is encoded on first use and kept (_loss_function.references)
    idle = [*(() if edit else (pipe.vae,)), *(text_encoders.values() if cache_text else ())]
    if config.cache_latents:
        from personalize.data import cache_dataset

        cache_dir = config.data.cache_dir or None
        instance_data = cache_dataset(instance_data, pipe, cache_dir=cache_dir, cache_text=cache_text)
        if class_data is not None:
            class_data = cache_dataset(class_data, pipe, cache_dir=cache_dir, cache_text=cache_text)
        idle_until_validation(idle, device, own_pipe)
    validation_extra: dict[str, Any] = {}
    if edit:
        from personalize.data.decode import decode, read_bytes
        from personalize.data.edit import first_source, pair_sources

        instance_data = pair_sources(instance_data, source_files)  # items get "source" pixels, aligned
        validation_extra["image"] = decode(read_bytes(first_source(instance_data, source_files))).image

    # --- model: quantize, inject / unfreeze ---------------------------------------------------
    original = pipe.transformer
    changes_base = config.method == "full" or bool(config.quantize)  # a caller's transformer must stay as it was
    transformer = copy.deepcopy(original) if (changes_base and not own_pipe) else original
    pipe.transformer = transformer
    hyper = _hyperparameters(config)
    trained: dict[str, torch.nn.Module] = {"transformer": transformer}
    if config.method == "full":
        place(transformer, device, torch.float32).requires_grad_(True)
    else:
        from personalize import adapters

        if config.quantize:
            _quantize(transformer, family, config.quantize, weight_dtype, own_pipe, device)
        elif own_pipe:  # one tensor at a time from the files: the fp32 map never resident beside the copy
            from personalize.models.mapped import cast_from_files

            cast_from_files(transformer, weight_dtype)
        place(transformer, device, weight_dtype)
        adapters.inject(transformer, config.method, targets=config.targets, name=config.adapter_name, **hyper)
        if config.train_text_encoder:
            for name in family.trainable_text_encoders:
                adapters.inject(text_encoders[name], config.method, targets="text", name=config.adapter_name, **hyper)
                trained[name] = text_encoders[name]
    named = prepare_trained(trained, "transformer", config)

    # --- optimizer, schedule, loop state ------------------------------------------------------
    optimizer, lr_scheduler = optimizer_and_schedule(trained, config)
    prepared, optimizer = accelerator.prepare(transformer, optimizer)  # DDP wraps the transformer only
    models = [prepared, *[module for name, module in trained.items() if name != "transformer"]]
    unwrapped_sync = [param for name, param in named.items() if not name.startswith("transformer.")]
    generator = torch.Generator().manual_seed(config.seed * 1_000 + accelerator.process_index)
    stream = _stream(instance_data, class_data, config, accelerator)
    ema = EMA(list(named.values()), config.ema_decay) if config.ema else None
    state = TrainState(named, optimizer, lr_scheduler, stream, generator, ema)
    begin_training(accelerator, state, resume_from, config, output, say)
    _summary(say, config, family.name, instance_data, class_data, named)
    say(f"objective   flow matching, weighting {config.weighting_scheme}" + _objective_note(config))

    # --- train --------------------------------------------------------------------------------
    settings = flow_step.FlowSettings(
        weighting_scheme=config.weighting_scheme,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        precondition_outputs=bool(config.precondition_outputs),
        guidance_scale=config.guidance_scale,
    )
    schedule = flow_step.flow_schedule(pipe.scheduler.config)
    compute_loss = _loss_function(pipe, family, models[0], schedule, settings, generator, config, weight_dtype)
    prompts = config.validation_prompts or [instance_data_prompt(instance_data)]
    samples: list[Path] = []

    def validate(step: int) -> None:
        if accelerator.is_main_process and config.validation_images > 0:
            samples.append(
                _validate(
                    pipe, transformer, text_encoders, prompts, output, step, config, ema, accelerator, validation_extra
                )
            )
            logs.log_image(accelerator, "samples", samples[-1], step)
            if config.cache_latents and step < config.steps:  # training goes on: the encoders idle again
                idle_until_validation(idle, device, own_pipe)

    started = time.perf_counter()
    memory = step_memory_settings(config, device, weight_dtype, frozen=[transformer])
    loop_settings = LoopSettings.from_config(config, checkpoint_root, average_gradients=unwrapped_sync, **memory)
    for model in models:
        model.train()
    train_loop(accelerator, models, compute_loss, state, loop_settings, on_validate=validate)
    seconds = time.perf_counter() - started
    for model in models:
        model.eval()

    # --- outputs ------------------------------------------------------------------------------
    files = _write_outputs(accelerator, config, family, trained, hyper, ema, state, output, samples, validate, prompts)
    metrics = run_metrics(state, seconds)
    if accelerator.is_main_process:
        card = _card(config, family, files, output, samples, metrics, hyper, trained, prompts)
        done = f"done in {seconds:.0f} s; final loss {metrics['final_loss']:.4f}"
        files = write_run_files(output, card, files, samples, metrics, state, say, done)
    evaluate_output(accelerator, output, config, state, metrics, say)
    accelerator.wait_for_everyone()
    if not own_pipe:
        _restore_pipe(pipe, original, trained, config, denoiser="transformer")
    accelerator.end_training()  # closes the trackers (--report-to)
    accelerator.free_memory()
    raise_if_interrupted(state, output, config.steps)
    return TrainResult(output, files, samples, metrics)


# --- pieces of the recipe ----------------------------------------------------------------------


def _family(config: TrainConfig, pipe: Any) -> FamilyDescription:
    from personalize.models.families import described_family

    family = described_family(config.model, pipe)
    if family is None:
        raise UserError(f"{config.model} is not a flow-matching DiT model (SD3, Flux); use the DreamBooth recipe")
    return family


def with_family_defaults(config: TrainConfig, family: FamilyDescription) -> TrainConfig:
    """The family's reference defaults for what the user left unset (before the method defaults fill the rest)."""
    updates: dict[str, Any] = {}
    defaults = family.method_defaults(config.method)
    if defaults is not None:
        rank, lr, steps = defaults
        for key, value in (("rank", rank), ("lr", lr), ("steps", steps)):
            if getattr(config, key) is None:
                updates[key] = value
    if not config.targets and config.method in RANKED_METHODS:
        updates["targets"] = family.default_targets
    if not config.weighting_scheme:
        updates["weighting_scheme"] = family.weighting_scheme
    if config.precondition_outputs is None:
        updates["precondition_outputs"] = family.precondition_outputs
    if config.guidance_scale is None and family.guidance_scale is not None:
        updates["guidance_scale"] = family.guidance_scale
    if family.clip is not None:  # a video family: clips of its default length and rate unless set
        frames, fps = family.clip
        updates["data"] = dataclasses.replace(
            config.data, frames=config.data.frames or frames, fps=config.data.fps or fps
        )
    elif config.data.frames:
        raise UserError(
            f"data.frames is for video models; {config.model} ({family.name}) trains on images: drop data.frames"
        )
    return dataclasses.replace(config, **updates)


def _family_resolution(config: TrainConfig, family: FamilyDescription) -> TrainConfig:
    """The family's training side when the user set none and the model config names none (Wan: 480);
    the tiny models train at 64 px."""
    from personalize.models import is_tiny

    if config.data.resolution or family.native_resolution is None:
        return config
    side = 64 if is_tiny(config.model) else family.native_resolution
    return dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=side))


def _check_method(config: TrainConfig, family: FamilyDescription) -> None:
    if config.method not in FLOW_METHODS:
        raise UserError(
            f"--method {config.method} is not available for {family.name} models; choose one of "
            f"{', '.join(FLOW_METHODS)}"
        )


def _check_text_encoder(config: TrainConfig, family: FamilyDescription) -> None:
    if config.train_text_encoder and not family.trainable_text_encoders:
        raise UserError(
            f"--train-text-encoder: {family.name} models have no text encoder the reference script adapts "
            "(it trains the transformer only); drop the flag"
        )


def _check_edit(config: TrainConfig, family: FamilyDescription) -> None:
    """--task edit needs a family with an edit input, and pairs: no class images (they have no source)."""
    if not config.edit.sources:
        return
    if family.predict_edit is None:
        from personalize.models.families import FLOW_FAMILIES

        edit_families = [name for name, described in FLOW_FAMILIES.items() if described.predict_edit is not None]
        raise UserError(
            f"--task edit needs an edit model; {config.model} is {family.name}, which takes no source image "
            f"(edit families: {', '.join(edit_families)}, e.g. --model tiny-flux-kontext)"
        )
    if config.prior_preservation:
        raise UserError("--task edit trains on (source, target) pairs; drop --prior-preservation")


def _check_distilled(config: TrainConfig, family: FamilyDescription, transformer_config: Any) -> str | None:
    """A distilled model (FLUX.1-schnell) trains only with consent (before anything is loaded when the
    config can be read without the weights)."""
    caveat = family.distilled(dict(transformer_config)) if transformer_config is not None else None
    if caveat and not config.allow_distilled:
        raise UserError(caveat)
    return caveat


def _check_model(config: TrainConfig, family: FamilyDescription, pipe: Any, say: Any) -> TrainConfig:
    """What the model itself rules out: a distilled model without consent, a resolution it cannot take."""
    from personalize.models.encode import vae_factors

    transformer_config = dict(pipe.transformer.config)
    _check_distilled(config, family, transformer_config)
    spatial, temporal = vae_factors(pipe.vae.config)  # WanPipeline has no vae_scale_factor
    vae_factor = int(getattr(pipe, "vae_scale_factor", 0)) or spatial
    multiple = vae_factor * family.latent_multiple(transformer_config)
    data = config.data
    if data.frames and (data.frames - 1) % temporal:
        nearest = max(1, round((data.frames - 1) / temporal)) * temporal + 1
        raise UserError(
            f"data.frames {data.frames} does not fit this model: its VAE compresses {temporal} frames into one "
            f"after the first, so clips have {temporal}k + 1 frames; use e.g. {nearest}"
        )
    if data.resolution % multiple:
        nearest = max(multiple, round(data.resolution / multiple) * multiple)
        raise UserError(
            f"--resolution {data.resolution} is not a multiple of {multiple} (VAE x{vae_factor} times the "
            f"transformer's patch of {multiple // vae_factor}); use e.g. {nearest}"
        )
    if data.bucketing and data.bucket_step % multiple:
        raise UserError(f"data.bucket_step {data.bucket_step} must be a multiple of {multiple} for this model")
    if data.bucketing and data.bucket_step > data.resolution:  # tiny resolutions: buckets in the model's steps
        config = dataclasses.replace(config, data=dataclasses.replace(data, bucket_step=math.lcm(multiple, 8)))
    return config


def _quantize(
    transformer: torch.nn.Module, family: FamilyDescription, mode: str, dtype: torch.dtype, from_disk: bool, device: Any
) -> None:
    """The frozen transformer's Linear layers in 4/8 bits (bitsandbytes), read one weight at a time from its
    files when this run loaded it; the embedders and the final projection stay in full precision."""
    from personalize import adapters
    from personalize.models.mapped import tensor_reader
    from personalize.trainers.common.step_memory import return_freed_memory

    reader = tensor_reader(transformer) if from_disk else None
    adapters.quantize(transformer, mode, family.full_precision, dtype, read_weight=reader, device=device)
    return_freed_memory()


def _objective_note(config: TrainConfig) -> str:
    parts = []
    if config.weighting_scheme == "logit_normal":
        parts.append(f" (mean {config.logit_mean:g}, std {config.logit_std:g})")
    if config.weighting_scheme == "mode":
        parts.append(f" (scale {config.mode_scale:g})")
    if config.precondition_outputs:
        parts.append(", preconditioned outputs")
    if config.guidance_scale is not None:
        parts.append(f", guidance {config.guidance_scale:g}")
    return "".join(parts)


def _loss_function(
    pipe: Any,
    family: FamilyDescription,
    transformer: torch.nn.Module,
    schedule: flow_step.FlowSchedule,
    settings: flow_step.FlowSettings,
    generator: torch.Generator,
    config: TrainConfig,
    compute_dtype: torch.dtype,
) -> Any:
    from personalize.data.edit import SOURCE_KEY
    from personalize.models.encode import encode_images

    device = next(transformer.parameters()).device
    source_latents: dict[str, torch.Tensor] = {}  # item key (target file + crop/flip) -> source latents (C, h, w)

    def references(batch: dict[str, Any]) -> torch.Tensor:
        """The edit sources' latents (B, C, h, w), each encoded once per crop/flip (the target's plan)."""
        todo = [row for row, key in enumerate(batch["key"]) if key not in source_latents]
        if todo:
            with torch.no_grad():
                pixels = batch[SOURCE_KEY][todo] * 2 - 1  # (b, 3, H, W) in [-1, 1]
                for row, latents in zip(todo, encode_images(pipe.vae, pixels).float().cpu()):
                    source_latents[batch["key"][row]] = latents
        return torch.stack([source_latents[key] for key in batch["key"]])

    edit_embeds: dict[str, Embeds] = {}  # item key -> its instruction's embeddings with its source picture

    def edit_prompts(batch: dict[str, Any]) -> Embeds:
        """Embeddings of instructions the text encoder reads with their source picture (Qwen-Image-Edit),
        each (source crop, instruction) encoded once."""
        assert family.encode_edit_prompt is not None
        for row, key in enumerate(batch["key"]):
            if key not in edit_embeds:
                prompt, source = [batch["prompt"][row]], batch[SOURCE_KEY][row : row + 1]
                with torch.no_grad():
                    embeds = family.encode_edit_prompt(pipe, prompt, source)
                edit_embeds[key] = {name: value.cpu() for name, value in embeds.items()}
        return stack_rows([edit_embeds[key] for key in batch["key"]])

    def encode(batch: dict[str, Any]) -> dict[str, Any]:
        """Fill in what the cache did not provide: latents from pixels, embeddings from prompts."""
        batch = dict(batch)
        if SOURCE_KEY in batch:
            batch["reference"] = references(batch)
        if "latents" not in batch:
            with torch.no_grad():
                batch["latents"] = encode_images(pipe.vae, batch["pixels"]).float()  # (B, C, h, w)
        if "prompt_embeds" not in batch and SOURCE_KEY in batch and family.encode_edit_prompt is not None:
            batch.update(edit_prompts(batch))
        elif "prompt_embeds" not in batch:
            with torch.enable_grad() if config.train_text_encoder else torch.no_grad():
                batch.update(family.encode_prompt(pipe, list(batch["prompt"])))
        return batch

    def compute_loss(batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        batches = [encode(item) for item in (batch if isinstance(batch, list) else [batch])]
        per_sample, weights, is_class = [], [], []
        keep = ("latents", "is_class", "reference", *family.embed_keys)
        for group in unet_step.concat_batches([{k: item[k] for k in keep if k in item} for item in batches]):
            latents = group["latents"].to(device, dtype=torch.float32)  # (B, C, h, w); video (B, C, F, h, w)
            embeds = {key: group[key] for key in family.embed_keys}
            reference = group.get("reference")  # (B, C, h, w): edit pairs' source latents
            values, sample_weights = flow_step.per_sample_loss(
                family, transformer, latents, embeds, schedule, settings, generator, compute_dtype, reference
            )
            per_sample.append(values)
            weights.append(sample_weights)
            is_class.append(group["is_class"].to(device))
        return losses.combine(
            torch.cat(per_sample), torch.cat(weights), torch.cat(is_class), prior_weight=config.prior_loss_weight
        )

    return compute_loss


def _write_outputs(
    accelerator: Any,
    config: TrainConfig,
    family: FamilyDescription,
    trained: dict[str, torch.nn.Module],
    hyper: dict[str, Any],
    ema: EMA | None,
    state: TrainState,
    output: Path,
    samples: list[Path],
    validate: Any,
    prompts: list[str],
) -> list[Path]:
    from personalize.trainers.common.outputs import save_outputs

    files: list[Path] = []
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the adapter first: a crash while sampling never loses it
        with ema.swap() if ema is not None else nullcontext():
            components = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
            files = save_outputs(
                output,
                method=config.method,
                family=family.name,
                base_model=config.model,
                components=components,
                adapter_name=config.adapter_name,
                hyper=hyper,
                resolution=config.data.resolution,
            )
        if needs_final_samples(state, samples):
            validate(state.step)
    return files


def _card(
    config: TrainConfig,
    family: FamilyDescription,
    files: list[Path],
    output: Path,
    samples: list[Path],
    metrics: dict[str, Any],
    hyper: dict[str, Any],
    trained: dict[str, torch.nn.Module],
    prompts: list[str],
) -> str:
    from personalize.trainers.common.model_card import render_model_card

    settings = _card_settings(config)
    settings.update(weighting_scheme=config.weighting_scheme, guidance_scale=config.guidance_scale or "")
    settings.update(precondition_outputs=config.precondition_outputs, defaults_from=family.defaults_source)
    return render_model_card(
        base_model=config.model,
        family=family.name,
        method=config.method,
        trigger=config.data.token,
        prompt=prompts[0],
        settings=settings,
        files=files,
        output_dir=output,
        samples=samples,
        metrics=metrics,
        adapter={"hyper": hyper, "targets": config.targets, "components": list(trained), "name": config.adapter_name},
    )
