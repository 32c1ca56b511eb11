"""TrainConfig: every key of `personalize train` (flags, presets and `--set` all map onto it).

Method-dependent defaults (rank, alpha, lr, steps, targets) are None here and filled in by
`resolve()` from METHOD_DEFAULTS, so the saved config.yaml always holds the values actually used.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from personalize.config import from_dict, merge, nearest, option
from personalize.data import DataConfig
from personalize.errors import UserError
from personalize.trainers.conditioning_config import CONDITIONING_DEFAULTS, CONDITIONING_METHODS, ConditioningConfig

METHODS = ("lora", "locon", "dora", "loha", "lokr", "krona", "ia3", "bitfit", "norm", "full", *CONDITIONING_METHODS)
RANKED_METHODS = ("lora", "locon", "dora", "loha", "lokr")
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# method -> (rank, lr, steps, UNet targets). Sources: diffusers' DreamBooth docs (full: lr 5e-6,
# 400 steps; LoRA: lr 1e-4, 500 steps), DiffuseKronA (KronA: lr 1e-3, 500 steps, attention q/k/v/out),
# IA3 / BitFit papers (vectors and biases train with a ~10x larger lr than LoRA).
METHOD_DEFAULTS: dict[str, tuple[int | None, float, int, str]] = {
    "lora": (16, 1e-4, 500, "attention"),
    "locon": (16, 1e-4, 500, "all"),
    "dora": (16, 1e-4, 500, "attention"),
    "loha": (8, 1e-4, 500, "attention"),
    "lokr": (8, 1e-4, 500, "attention"),
    "krona": (None, 1e-3, 500, "attention"),
    "ia3": (None, 1e-3, 500, "attention+ff"),
    "bitfit": (None, 1e-3, 500, "all"),
    "norm": (None, 1e-3, 500, "all"),
    "full": (None, 5e-6, 400, ""),
    **CONDITIONING_DEFAULTS,
}


@dataclass
class TrainConfig:
    model: str = option(DEFAULT_MODEL, "base model: hub id, diffusers folder, .safetensors file, or tiny-sd15")
    method: Literal[
        "lora",
        "locon",
        "dora",
        "loha",
        "lokr",
        "krona",
        "ia3",
        "bitfit",
        "norm",
        "full",
        "controlnet",
        "t2i-adapter",
        "ip-adapter",
    ] = option("lora", "what to train: an adapter method, 'full' (DreamBooth), or controlnet/t2i-adapter/ip-adapter")
    rank: int | None = option(None, "adapter rank; None: the method's default (16 for LoRA)")
    alpha: float | None = option(None, "adapter alpha (scale alpha/rank); None: equal to the rank (scale 1)")
    targets: str = option(
        "", "layers to adapt: a preset (attention, attention+ff, conv, all) or a regex; '' = method default"
    )
    method_options: dict[str, Any] = option(
        {}, "extra hyperparameters for the method, e.g. {factor: 8} or {a1: 64, a2: 8}"
    )
    train_text_encoder: bool = option(False, "also adapt the text encoder(s) (slower; stronger identity)")
    text_encoder_lr: float | None = option(None, "lr of the text encoder adapters; None: the same as lr")
    data: DataConfig = option(
        help="images, prompts, resolution, class images (see personalize.data)", default_factory=DataConfig
    )
    conditioning: ConditioningConfig = option(
        help="controlnet / t2i-adapter / ip-adapter: paired images, annotator, image encoder",
        default_factory=ConditioningConfig,
    )
    prior_preservation: bool = option(False, "DreamBooth prior preservation: train on class images too")
    prior_loss_weight: float = option(1.0, "weight of the class-image loss (DreamBooth uses 1.0)")
    steps: int | None = option(None, "optimizer steps; None: the method's default")
    lr: float | None = option(None, "peak learning rate; None: the method's default")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = option("constant", "learning-rate schedule after the warm-up (diffusers.optimization.get_scheduler)")
    lr_warmup_steps: int = option(0, "linear warm-up steps of the learning rate")
    batch_size: int = option(1, "images per micro-batch and process (DreamBooth works well with 1)")
    grad_accum: int = option(
        1, "micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes)"
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = option(
        "no", "compute dtype of the frozen base; adapters stay fp32"
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% slower")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = option(
        "adamw", "adamw8bit needs bitsandbytes; prodigy needs prodigyopt"
    )
    weight_decay: float = option(1e-2, "AdamW weight decay (torch's default)")
    adam_betas: list[float] = option([0.9, 0.999], "AdamW betas (torch's default)")
    adam_epsilon: float = option(1e-8, "AdamW epsilon (torch's default)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping), as diffusers' scripts do")
    quantize: Literal["", "nf4", "fp4", "int8"] = option(
        "", "load the frozen UNet Linear layers 4-/8-bit (QLoRA); '' = off"
    )
    snr_gamma: float = option(0.0, "Min-SNR loss weighting gamma (5.0 is the paper's value); 0 = off")
    noise_offset: float = option(0.0, "offset noise strength (0.05-0.1 helps very dark/bright images); 0 = off")
    ema: bool = option(False, "keep an exponential moving average of the trainable weights and save it")
    ema_decay: float = option(0.999, "EMA decay per step")
    validation_prompts: list[str] = option([], "prompts sampled into samples/ during and after training")
    validate_every: int = option(0, "sample the validation prompts every N steps; 0: only at the end")
    validation_steps: int = option(25, "denoising steps of each validation image")
    validation_images: int = option(2, "images per validation prompt (seeds seed, seed+1, ...)")
    checkpoint_every: int = option(250, "write a resumable checkpoint every N steps; 0: never")
    keep_checkpoints: int = option(2, "keep only the newest K checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in the output dir")
    seed: int = option(0, "seed of noise, timesteps, data order and validation images")
    output: str = option("", "output folder; '' = ./personalize-out/<images folder name>")
    attention: Literal["sdpa", "xformers"] = option(
        "sdpa", "attention kernel: PyTorch SDPA, or xformers (CUDA + extra)"
    )
    cache_latents: bool = option(True, "encode images and prompts once, then free the VAE and text encoders")
    allow_pickle: bool = option(False, "allow loading a pickle (.ckpt) base model; only for files you trust")
    adapter_name: str = option("default", "name of the injected adapter (several can stack on one model)")


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """TrainConfig from keyword options; data keys may be given flat (images=..., resolution=...)."""
    train_keys = {item.name for item in dataclasses.fields(TrainConfig)}
    data_keys = {item.name for item in dataclasses.fields(DataConfig)}
    top: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for key, value in options.items():
        if key == "data" and dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)  # type: ignore[arg-type]
        if key in train_keys:
            top[key] = value
        elif key in data_keys:
            data[key] = value
        else:
            raise UserError(f"unknown training option '{key}'{nearest(key, train_keys | data_keys)}")
    if data:
        top["data"] = merge(top.get("data", {}), data)
    return from_dict(TrainConfig, top)


def infer_words(folder: str) -> tuple[str | None, str | None]:
    """(token, class word) from an image folder's name: 'sks_dog' -> (sks, dog), 'cat' -> (None, cat)."""
    words = [word for word in re.split(r"[^A-Za-z0-9]+", Path(folder).name) if word]
    words = [word for word in words if not word.isdigit()]  # kohya's '10_sks dog' repeat prefix
    if len(words) >= 2:
        return words[0].lower(), " ".join(words[1:]).lower()
    if len(words) == 1:
        return None, words[0].lower()
    return None, None


def resolve(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """Fill in method defaults, the trigger words and the output dir; returns (config, notes to print)."""
    notes: list[str] = []
    rank, lr, steps, targets = METHOD_DEFAULTS[config.method]
    data = config.data
    if not data.images:
        raise UserError("no training images given; pass --images DIR (a folder of photos of your subject)")
    if not Path(data.images).expanduser().exists():  # before the (slow) model load
        raise UserError(f"--images {data.images} does not exist; point it at a folder of photos of your subject")
    token, class_word = infer_words(str(Path(data.images).expanduser().resolve()))
    updates: dict[str, Any] = {}
    if not data.class_word and class_word:
        updates["class_word"] = class_word
        notes.append(f"class word '{class_word}' (from the folder name; set it with --class-word)")
    if token and data.token == "sks" and not data.instance_prompt:
        updates["token"] = token
        notes.append(f"trigger token '{token}' (from the folder name; set it with --token)")
    updates["images"] = str(Path(data.images).expanduser().absolute())  # config.yaml reruns from anywhere
    for key in ("class_dir", "cache_dir"):
        if getattr(data, key):
            updates[key] = str(Path(getattr(data, key)).expanduser().absolute())
    data = dataclasses.replace(data, **updates)
    resolved = dataclasses.replace(
        config,
        data=data,
        rank=config.rank if config.rank is not None else rank,
        lr=config.lr if config.lr is not None else lr,
        steps=config.steps if config.steps is not None else steps,
        targets=config.targets or targets,
        output=str(
            Path(
                config.output or Path("personalize-out") / (Path(data.images).expanduser().resolve().name or "run")
            ).absolute()
        ),
    )
    if resolved.alpha is None and resolved.rank is not None:
        resolved = dataclasses.replace(resolved, alpha=float(resolved.rank))
    check(resolved)
    return resolved, notes


def check(config: TrainConfig) -> None:
    """Values a dataclass type cannot express; each error names the flag to change."""
    positive = {"steps": config.steps, "batch_size": config.batch_size, "grad_accum": config.grad_accum}
    for key, value in positive.items():
        if value is None or value < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1 (got {value})")
    if config.lr is None or config.lr <= 0:
        raise UserError(f"--lr must be positive (got {config.lr})")
    if config.rank is not None and config.rank < 1:
        raise UserError(f"--rank must be at least 1 (got {config.rank})")
    if config.method == "full" and config.quantize:
        raise UserError("--quantize trains an adapter on a frozen quantized base; it cannot be used with --method full")
    if config.method == "full" and config.train_text_encoder:
        raise UserError("--method full fine-tunes the UNet only; use an adapter --method with --train-text-encoder")
    if not 0 <= config.ema_decay < 1:
        raise UserError(f"ema_decay must be in [0, 1) (got {config.ema_decay})")
    if len(config.adam_betas) != 2:
        raise UserError(f"adam_betas must be two numbers, e.g. [0.9, 0.999] (got {config.adam_betas})")
