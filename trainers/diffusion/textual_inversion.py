"""Textual Inversion, pivotal tuning and ED-LoRA: `personalize train --method textual-inversion|pivotal|ed-lora`.

Textual Inversion (Gal et al., arXiv 2208.01618) learns only the embedding rows of a new token
("<cat-toy>", n vectors) in every text encoder; pivotal tuning (the recipe of diffusers' advanced
DreamBooth scripts) trains those rows and an adapter on the UNet (any method of the injection core,
LoRA by default) together, with their own learning rates, the token frozen after a fraction of the steps.
ED-LoRA (Mix-of-Show, Gu et al. 2023, arXiv 2305.18292) is pivotal tuning with a layer-wise token: one set
of vectors per cross-attention layer of the UNet ('<tok>' for the first, '<tok>@l' for layer l; the prompt
is encoded once per layer, see personalize.pipelines.layerwise), with LoRAs on the UNet's attention and
the text encoder's attention, so that fused subjects keep separate triggers.

Reads top to bottom like the DreamBooth recipe, whose pieces it reuses: resolve, load the base, build
the data (latents cached; prompts are encoded every step because the token changes), add the token,
inject the adapter (pivotal), run the shared loop, then write learned_embeds.safetensors (+ the
adapter) through personalize.formats, samples, config.yaml and README.md.

    from personalize.trainers import train
    train(images="photos/toy", model="tiny-sd15", method="textual-inversion", token="<toy>", init_word="toy")
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from personalize.data.sources import instance_prompt
from personalize.errors import UserError
from personalize.pipelines import layerwise
from personalize.pipelines.layerwise import layer_token
from personalize.trainers.common.ema import EMA
from personalize.trainers.common.frozen_base import (
    idle_until_validation,
    load_frozen_base,
    place,
    quantize_base,
    with_model_resolution,
)
from personalize.trainers.common.loop import (
    LoopSettings,
    TrainState,
    needs_final_samples,
    raise_if_interrupted,
    train_loop,
)
from personalize.trainers.common.optim import build_lr_scheduler, build_optimizer
from personalize.trainers.common.run import begin_training, run_metrics, start_run
from personalize.trainers.common.step_memory import step_memory_settings
from personalize.trainers.diffusion import unet_step
from personalize.trainers.diffusion.config import RANKED_METHODS, TrainConfig, config_from_options, resolve
from personalize.trainers.diffusion.dreambooth import (
    TrainResult,
    _card_settings,
    _datasets,
    _loss_function,
    _set_attention,
    _stream,
    _summary,
    _trainable,
    _validate,
)
from personalize.trainers.diffusion.new_tokens import NewTokens, add_new_tokens, expand_prompt, template_prompt


def train(config: TrainConfig | None = None, *, pipe: Any = None, **options: Any) -> TrainResult:
    """Run the recipe (`options`: TrainConfig keys; data keys such as images= and token= may be given flat).

    A given `pipe` is left as it was: its tokenizers and embeddings are put back, adapters removed."""
    config, notes = resolve(config if config is not None else config_from_options(options), pipe)
    pivotal = config.method in ("pivotal", "ed-lora")  # a token and an adapter
    accelerator, say, output, checkpoint_root, resume_from = start_run(config, notes)

    # --- base model ---------------------------------------------------------------------------
    base = load_frozen_base(config, accelerator, pipe)
    config = with_model_resolution(config, base.pipe, say)
    pipe, own_pipe, family, device = base.pipe, base.own_pipe, base.family, base.device
    weight_dtype, text_encoders = base.weight_dtype, base.text_encoders

    # --- data: latents cached, prompts encoded each step (the token is what trains) --------------
    instance_data, class_data = _datasets(config, pipe, output, say)
    if config.cache_latents:
        from personalize.data import cache_dataset

        cache_dir = config.data.cache_dir or None
        instance_data = cache_dataset(instance_data, pipe, cache_dir=cache_dir, cache_text=False)
        if class_data is not None:
            class_data = cache_dataset(class_data, pipe, cache_dir=cache_dir, cache_text=False)
        idle_until_validation([pipe.vae], device, own_pipe)

    # --- model: the new token (+ the adapter for pivotal) ----------------------------------------
    init_generator = torch.Generator().manual_seed(config.seed)
    layers = _token_layers(pipe, config)
    tokens = add_new_tokens(pipe, config.data.token, config.vectors, config.init_word, init_generator, layers)
    unet = pipe.unet
    adapter_method = config.pivotal_method if pivotal else ""
    hyper = _adapter_hyperparameters(config) if pivotal else {}
    trained: dict[str, torch.nn.Module] = {}
    if pivotal:
        from personalize import adapters

        if config.quantize:
            quantize_base(unet, config.quantize, weight_dtype, from_disk=own_pipe, device=device)
        place(unet, device, weight_dtype)
        adapters.inject(unet, adapter_method, targets=config.targets, name=config.adapter_name, **hyper)
        trained["unet"] = unet
        if config.train_text_encoder:
            for name, encoder in text_encoders.items():
                adapters.inject(encoder, adapter_method, targets="text", name=config.adapter_name, **hyper)
                trained[name] = encoder
    else:
        place(unet, device, weight_dtype)
    trained["embeddings"] = tokens.rows
    named = _trainable(trained)
    for param in named.values():
        param.data = param.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    _set_attention(unet, config.attention)
    if layers > 1:  # after the attention kernels are set: the layer hooks sit on the cross-attention modules
        layerwise.install(pipe, {tokens.token: layers})

    # --- optimizer, schedule, loop state ------------------------------------------------------
    optimizer = build_optimizer(
        config.optimizer,
        _param_groups(trained, config),
        lr=config.lr,  # type: ignore[arg-type]
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = build_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, config.steps)  # type: ignore[arg-type]
    prepared = accelerator.prepare(*trained.values(), optimizer)
    models, optimizer = list(prepared[:-1]), prepared[-1]
    rows_model = models[-1]  # NewRows (data-parallel wrapped when there are several processes)
    generator = torch.Generator().manual_seed(config.seed * 1_000 + accelerator.process_index)
    stream = _stream(instance_data, class_data, config, accelerator)
    ema = EMA(list(named.values()), config.ema_decay) if config.ema else None
    state = TrainState(named, optimizer, lr_scheduler, stream, generator, ema)
    begin_training(accelerator, state, resume_from, config, output, say)
    _summary(say, config, family, instance_data, class_data, named)
    stop_step = round(config.steps * config.stop_embedding_after)  # type: ignore[operator]
    per_layer = f" x {layers} cross-attention layers (<tok>@l)" if layers > 1 else ""
    names = " ".join(tokens.names[: tokens.vectors])
    say(f"token       {names}{per_layer} (init '{config.init_word or 'random'}'), trained for {stop_step} steps")

    # --- train --------------------------------------------------------------------------------
    schedule = unet_step.noise_schedule(pipe.scheduler.config)
    unet_model = models[0] if pivotal else unet
    denoising_loss = _loss_function(pipe, family, unet_model, schedule, generator, config)
    rewrite = _prompt_rewriter(config, tokens, generator)

    def compute_loss(batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Encode this step's prompts through the current token rows, then the DreamBooth loss."""
        learning = state.step < stop_step and not _norm_reached(tokens, config.embedding_norm_limit)
        with torch.set_grad_enabled(learning):  # frozen: no graph, and no gradient for data parallelism to wait on
            rows = rows_model()
        tokens.use(rows if learning else {name: value.detach() for name, value in rows.items()})
        encoded = []
        for item in batch if isinstance(batch, list) else [batch]:
            prompts = [rewrite(prompt) for prompt in item["prompt"]]
            with torch.set_grad_enabled(learning or config.train_text_encoder):
                encoded.append({**item, **_encode_with_token(pipe, prompts, tokens)})
        tokens.use(dict(tokens.rows.rows.items()))  # validation reads the live parameters
        with accelerator.autocast():  # a frozen UNet is not wrapped by accelerate.prepare (textual-inversion)
            return denoising_loss(encoded if isinstance(batch, list) else encoded[0])

    prompts = config.validation_prompts or [_default_prompt(config, tokens, instance_data)]
    samples: list[Path] = []

    def validate(step: int) -> None:
        if accelerator.is_main_process and config.validation_images > 0:
            samples.append(_validate(pipe, unet, text_encoders, prompts, output, step, config, ema, accelerator))
            if config.cache_latents and step < config.steps:  # training goes on: the VAE idles again
                idle_until_validation([pipe.vae], device, own_pipe)

    started = time.perf_counter()
    memory = step_memory_settings(config, device, weight_dtype, frozen=[unet])
    settings = LoopSettings.from_config(config, checkpoint_root, **memory)
    for model in models:
        model.train()
    train_loop(accelerator, models, compute_loss, state, settings, on_validate=validate)
    seconds = time.perf_counter() - started
    for model in models:
        model.eval()

    # --- outputs ------------------------------------------------------------------------------
    from personalize.trainers.common.finish import evaluate_output, write_run_files
    from personalize.trainers.common.model_card import render_model_card
    from personalize.trainers.common.outputs import save_token_outputs

    files: list[Path] = []
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the token and adapter first: a crash while sampling never loses them
        with ema.swap() if ema is not None else nullcontext():
            adapted = {name: accelerator.unwrap_model(model) for name, model in zip(trained, models)}
            adapted.pop("embeddings")
            files = save_token_outputs(
                output,
                method=adapter_method or config.method,
                family=family,
                base_model=config.model,
                components=adapted,
                adapter_name=config.adapter_name,
                hyper=hyper,
                embeddings=tokens.learned(),
                resolution=config.data.resolution,
            )
        if needs_final_samples(state, samples):
            validate(state.step)
    metrics = run_metrics(state, seconds)
    if accelerator.is_main_process:
        card = render_model_card(
            base_model=config.model,
            family=family,
            method=config.method,
            trigger=config.data.token,
            prompt=prompts[0],
            settings=_card_settings(config) | _token_settings(config),
            files=files,
            output_dir=output,
            samples=samples,
            metrics=metrics,
            adapter={"tokens": tokens.names, "family": family},
        )
        done = f"done in {seconds:.0f} s; final loss {metrics['final_loss']:.4f}; prompt with {config.data.token}"
        files = write_run_files(output, card, files, samples, metrics, state, say, done)
    evaluate_output(accelerator, output, config, state, metrics, say)
    accelerator.wait_for_everyone()
    layerwise.remove(pipe)
    if own_pipe:
        tokens.install(pipe)  # the pipeline now holds the learned token, as after a stock load
    else:
        tokens.restore(pipe)
        _remove_adapters(trained, config)
    accelerator.free_memory()
    raise_if_interrupted(state, output, config.steps)
    return TrainResult(output, files, samples, metrics)


# --- pieces of the recipe ----------------------------------------------------------------------


def _adapter_hyperparameters(config: TrainConfig) -> dict[str, Any]:
    hyper: dict[str, Any] = {}
    if config.pivotal_method in RANKED_METHODS:
        hyper.update(rank=config.rank, alpha=config.alpha)
    hyper.update(config.method_options)
    return hyper


def _param_groups(trained: dict[str, torch.nn.Module], config: TrainConfig) -> list[dict[str, Any]]:
    """UNet adapter: lr; text-encoder adapters: text_encoder_lr (else lr); the token rows: embedding_lr."""
    groups = []
    for component, module in trained.items():
        params = [param for param in module.parameters() if param.requires_grad]
        if not params:
            raise UserError(f"nothing to train in the {component}: --targets {config.targets!r} matched no parameter")
        group: dict[str, Any] = {"params": params}
        if component == "embeddings":
            group["lr"] = config.embedding_lr
        elif component != "unet" and config.text_encoder_lr is not None:
            group["lr"] = config.text_encoder_lr
        groups.append(group)
    return groups


def _encode(pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    from personalize.models.encode import encode_text

    return encode_text(pipe, prompts)


def _norm_reached(tokens: NewTokens, limit: float) -> bool:
    """Mix-of-Show's stop: the token trains until the mean norm of its vectors reaches `limit` (0: never).
    Frozen rows keep their norm, so the stop holds from then on (also after a resume)."""
    if limit <= 0:
        return False
    with torch.no_grad():
        norms = [rows.norm(dim=-1).mean() for rows in tokens.rows.rows.values()]  # (L*n, d) -> mean row norm
        return float(torch.stack(norms).mean()) >= limit


def _token_layers(pipe: Any, config: TrainConfig) -> int:
    """ED-LoRA: the number of cross-attention layers (one set of token vectors each); else 1."""
    if config.method != "ed-lora":
        return 1
    unet = getattr(pipe, "unet", None)
    layers = len(layerwise.cross_attention_paths(unet)) if isinstance(unet, torch.nn.Module) else 0
    if not layers:
        raise UserError(
            f"--method ed-lora gives each cross-attention layer of a UNet its own token vectors; this "
            f"{type(pipe).__name__} has none (use --method pivotal)"
        )
    return layers


def _encode_with_token(pipe: Any, prompts: list[str], tokens: NewTokens) -> dict[str, torch.Tensor]:
    """Encode prompts holding '<tok>': '<tok>' expanded to its vectors; ED-LoRA: once per layer with that
    layer's token ('<tok>@l'), the encodings joined along the sequence (personalize.pipelines.layerwise)."""

    def encode_layer(layer: int) -> dict[str, torch.Tensor]:
        token = layer_token(tokens.token, layer)
        return _encode(
            pipe, [expand_prompt(layerwise.rewrite(p, [tokens.token], layer), token, tokens.vectors) for p in prompts]
        )

    state = layerwise.state_of(pipe)
    return encode_layer(0) if state is None else state.encode(encode_layer)


def _prompt_rewriter(config: TrainConfig, tokens: NewTokens, generator: torch.Generator) -> Any:
    """prompt -> the prompt trained on: a random template for uncaptioned images (textual-inversion).
    ('<tok>' is expanded to the token's vectors when it is encoded: `_encode_with_token`.)"""
    plain = "" if config.data.instance_prompt else instance_prompt(config.data)
    templates = config.method == "textual-inversion"

    def rewrite(prompt: str) -> str:
        if templates and prompt == plain:
            prompt = template_prompt(config.learnable_property, tokens.token, generator)
        return prompt

    return rewrite


def _default_prompt(config: TrainConfig, tokens: NewTokens, dataset: Any) -> str:
    from personalize.trainers.diffusion.dreambooth import instance_data_prompt

    if config.method == "textual-inversion":
        return template_prompt(config.learnable_property, tokens.token)
    return instance_data_prompt(dataset)


def _token_settings(config: TrainConfig) -> dict[str, Any]:
    keys = ("init_word", "vectors", "embedding_lr", "stop_embedding_after", "embedding_norm_limit")
    keys += ("learnable_property",) if config.method == "textual-inversion" else ("pivotal_method",)
    return {key: getattr(config, key) for key in keys}


def _remove_adapters(trained: dict[str, torch.nn.Module], config: TrainConfig) -> None:
    if config.method not in ("pivotal", "ed-lora"):
        return
    from personalize import adapters

    for component, module in trained.items():
        if component != "embeddings":
            adapters.remove(module, config.adapter_name)
