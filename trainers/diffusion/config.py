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
from personalize.data.edit import EditConfig
from personalize.errors import UserError
from personalize.models.tiny import TINY_DIFFUSION, TINY_TRAINING
from personalize.trainers.conditioning.config import CONDITIONING_DEFAULTS, CONDITIONING_METHODS, ConditioningConfig

METHODS = (
    *("lora", "locon", "dora", "loha", "lokr", "krona", "ia3", "oft", "boft", "vera", "difffit"),
    *("bitfit", "norm", "full"),
    *CONDITIONING_METHODS,
)
TOKEN_METHODS = ("textual-inversion", "pivotal", "ed-lora")  # recipe: trainers/diffusion/textual_inversion.py
RANKED_METHODS = ("lora", "locon", "dora", "loha", "lokr")
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
VALIDATION_STEPS = 25  # denoising steps of a validation sample (diffusers' examples sample with 25)

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
    # OFT/BOFT on the attention layers as the OFT paper's DreamBooth runs; the LoRA family's lr and steps.
    "oft": (None, 1e-4, 500, "attention"),
    "boft": (None, 1e-4, 500, "attention"),
    "vera": (None, 1e-3, 500, "attention"),  # vectors, like IA3/BitFit: ~10x LoRA's rate
    "bitfit": (None, 1e-3, 500, "all"),
    "difffit": (None, 1e-3, 500, ""),  # biases, norms and branch gammas; '' = DiffFit's own branch layers
    "norm": (None, 1e-3, 500, "all"),
    "full": (None, 5e-6, 400, ""),
    **CONDITIONING_DEFAULTS,
    # diffusers' Textual Inversion guide: 3000 steps, lr 5e-4 x (batch 1 x accum 4) with --scale_lr = 2e-3;
    # pivotal: the LoRA defaults for the UNet (the token has its own embedding_lr).
    "textual-inversion": (None, 2e-3, 3000, ""),
    "pivotal": (16, 1e-4, 1000, "attention"),
    # Mix-of-Show's ED-LoRA configs: LoRA rank 4 (scale 1) on every UNet attention projection at 1e-4, on the
    # text encoder's attention at 1e-5 (ED_LORA_TEXT_LR), the layer-wise token at 1e-3 (ED_LORA_EMBEDDING_LR)
    "ed-lora": (4, 1e-4, 1000, "attention"),
}
EMBEDDING_LR = 5e-4  # pivotal's token rows: the TI guide's unscaled rate
PIVOTAL_STOP = 0.5  # diffusers' advanced scripts train the token for the first half (train_text_encoder_ti_frac)
ED_LORA_EMBEDDING_LR = 1e-3
ED_LORA_TEXT_LR = 1e-5


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
        "oft",
        "boft",
        "vera",
        "difffit",
        "bitfit",
        "norm",
        "full",
        "textual-inversion",
        "pivotal",
        "ed-lora",
        "controlnet",
        "t2i-adapter",
        "ip-adapter",
        "controlnext",
    ] = option(
        "lora",
        "what to train: an adapter method, 'full' (fine-tune the whole UNet, DreamBooth), 'textual-inversion' "
        "(a new token only), 'pivotal' (a new token and an adapter together), 'ed-lora' (Mix-of-Show: a token "
        "per cross-attention layer, LoRAs on the UNet and text encoder), or a conditioning adapter "
        "(controlnet, t2i-adapter, ip-adapter, controlnext)",
    )
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
        help="controlnet / t2i-adapter / ip-adapter / controlnext: paired images, annotator, image encoder",
        default_factory=ConditioningConfig,
    )
    edit: EditConfig = option(
        help="--task edit: source images paired with the target images, instructions (edit models only)",
        default_factory=EditConfig,
    )
    prior_preservation: bool = option(False, "DreamBooth prior preservation: train on class images too")
    class_image_steps: int = option(25, "denoising steps of each generated class image (prior preservation)")
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
    validation_steps: int | None = option(None, "denoising steps of each validation image (None: 25, tiny models 10)")
    validation_images: int = option(2, "images per validation prompt (seeds seed, seed+1, ...); 0: no samples")
    eval: str = option(
        "", "after training, run `personalize eval` on the output: 'dreambench' or a prompt file; '' = off"
    )
    report_to: Literal["none", "tensorboard", "wandb"] = option(
        "none", "log loss, lr, grad norm and sample grids to tensorboard or wandb (accelerate's trackers)"
    )
    checkpoint_every: int = option(250, "write a resumable checkpoint every N steps; 0: never")
    keep_checkpoints: int = option(2, "keep only the newest K checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in the output dir")
    overwrite: bool = option(False, "replace a finished (or interrupted) run in the output dir")
    cpu_threads: str = option("auto", "CPU threads: auto (1 below 50M parameters, else one per core), all, or N")
    seed: int = option(0, "seed of noise, timesteps, data order and validation images")
    output: str = option("", "output folder; '' = ./personalize-out/<images folder name>")
    attention: Literal["sdpa", "xformers"] = option(
        "sdpa", "attention kernel: PyTorch SDPA, or xformers (CUDA + extra)"
    )
    lean_convs: bool = option(True, "frozen convolutions keep no input for backward: less memory, same gradients")
    cpu_conv: Literal["auto", "native", "onednn"] = option(
        "auto", "CPU convolution kernels; auto: PyTorch's native ones for fp32 (oneDNN copies each weight per call)"
    )
    cpu_allocator: Literal["auto", "lean", "default"] = option(
        "auto",
        "CPU runs: 'lean' gives the forward pass's large tensors their own pages and hands freed memory back "
        "to the OS after it (lower peak memory); auto: lean on a CPU with glibc",
    )
    cache_latents: bool = option(True, "encode images and prompts once, then free the VAE and text encoders")
    allow_pickle: bool = option(False, "allow loading a pickle (.ckpt) base model; only for files you trust")
    adapter_name: str = option("default", "name of the injected adapter (several can stack on one model)")
    init_word: str = option("", "textual-inversion/pivotal: word(s) the new token starts from; '' = random rows")
    vectors: int = option(1, "textual-inversion/pivotal: embedding vectors of the token (<tok> <tok>_1 ...)")
    embedding_lr: float | None = option(None, "lr of the token rows; None: --lr (textual-inversion) or 5e-4 (pivotal)")
    stop_embedding_after: float | None = option(
        None, "freeze the token after this fraction of the steps; None: 1.0 (textual-inversion) or 0.5 (pivotal)"
    )
    learnable_property: Literal["object", "style"] = option(
        "object", "textual-inversion: prompt templates for images without a caption ('a photo of a <tok>', ...)"
    )
    pivotal_method: str = option("lora", "pivotal: the adapter trained with the token (lora, loha, lokr, ...)")
    embedding_norm_limit: float = option(
        0.0, "freeze the token once the mean norm of its vectors reaches this (Mix-of-Show: 0.55 on SD1.5); 0 = off"
    )
    # flow-matching DiT models (SD3, Flux: trainers/diffusion/flow_matching.py); unset: the family's reference value
    weighting_scheme: Literal["", "logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = option(
        "",
        "flow matching: timestep density / loss weighting; '' = the family's (SD3: logit_normal, Flux: none)",
    )
    logit_mean: float = option(0.0, "flow matching, logit_normal: mean of u before the sigmoid")
    logit_std: float = option(1.0, "flow matching, logit_normal: standard deviation of u")
    mode_scale: float = option(1.29, "flow matching, mode: the scale s of the mode density")
    guidance_scale: float | None = option(None, "Flux.1-dev: the distilled guidance input while training; None: 3.5")
    precondition_outputs: bool | None = option(
        None, "flow matching: compare x0 = x_t - sigma * prediction with x0 (SD3's default); None: the family's"
    )
    allow_distilled: bool = option(False, "train a timestep-distilled model (FLUX.1-schnell) anyway")
    vram: str = option("", "fit this GPU memory (e.g. 16GB): the planner (personalize.plan) picks the settings")


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """TrainConfig from keyword options; data keys may be given flat (images=..., resolution=...).
    A run that names no method starts from its base folder's own training defaults, if it has any
    (personalize.models.training_defaults); every option given here wins over them."""
    from personalize.models.training_defaults import under_model_defaults

    options = under_model_defaults(options, DEFAULT_MODEL)
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


IN_MEMORY = "in-memory pipeline"


def pipeline_source(pipe: Any, model: str) -> str:
    """The base a run on a caller's `pipe` records: where the pipeline was loaded from (its
    `name_or_path`); else the --model the caller named; else an in-memory marker that
    `--config OUT/config.yaml` refuses, so a rerun never silently trains on another model."""
    source = getattr(pipe, "name_or_path", None)
    if isinstance(source, str) and source:
        return source
    if model != DEFAULT_MODEL:
        return model
    return f"{IN_MEMORY} ({type(pipe).__name__}): pass --model with the base it was loaded from"


def resolve(config: TrainConfig, pipe: Any = None) -> tuple[TrainConfig, list[str]]:
    """Fill in method defaults, the trigger words and the output dir; returns (config, notes to print).
    `pipe`: the caller's loaded pipeline, whose source becomes the recorded base model."""
    notes: list[str] = []
    rank, lr, steps, targets = METHOD_DEFAULTS[config.method]
    validation_steps = VALIDATION_STEPS
    if config.model in TINY_DIFFUSION:  # a model built in code for tests and demos carries its own defaults
        steps, lr = TINY_TRAINING["steps"], max(lr, TINY_TRAINING["min_lr"])
        validation_steps = TINY_TRAINING["validation_steps"]
    if pipe is not None:
        config = dataclasses.replace(config, model=pipeline_source(pipe, config.model))
    elif config.model.startswith(IN_MEMORY):
        raise UserError(f"this config was trained on an {IN_MEMORY}, not a model on disk; rerun it with --model BASE")
    data = config.data
    if not data.images:
        raise UserError("no training images given; pass --images DIR (a folder of photos of your subject)")
    if not Path(data.images).expanduser().exists():  # before the (slow) model load
        raise UserError(f"--images {data.images} does not exist; point it at a folder of photos of your subject")
    from personalize.trainers.common.optim import check_optimizer

    check_optimizer(config.optimizer)  # also before loading or caching anything
    token, class_word = infer_words(str(Path(data.images).expanduser().resolve()))
    if config.method in TOKEN_METHODS:  # a new word, never one the tokenizer knows
        token = f"<{token or class_word or 'concept'}>"
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
    evaluation = config.eval if config.eval in ("", "dreambench") else str(Path(config.eval).expanduser().absolute())
    resolved = dataclasses.replace(
        config,
        eval=evaluation,
        data=data,
        rank=config.rank if config.rank is not None else rank,
        lr=config.lr if config.lr is not None else lr,
        steps=config.steps if config.steps is not None else steps,
        validation_steps=config.validation_steps if config.validation_steps is not None else validation_steps,
        targets=config.targets or targets,
        output=str(
            Path(
                config.output or Path("personalize-out") / (Path(data.images).expanduser().resolve().name or "run")
            ).absolute()
        ),
    )
    if resolved.alpha is None and resolved.rank is not None:
        resolved = dataclasses.replace(resolved, alpha=float(resolved.rank))
    if config.method in TOKEN_METHODS:
        pivotal = config.method == "pivotal"
        default_lr = {"pivotal": EMBEDDING_LR, "ed-lora": ED_LORA_EMBEDDING_LR}.get(config.method, resolved.lr)
        resolved = dataclasses.replace(
            resolved,
            embedding_lr=config.embedding_lr or default_lr,
            stop_embedding_after=config.stop_embedding_after or (PIVOTAL_STOP if pivotal else 1.0),
        )
    if config.method == "ed-lora":  # ED-LoRA is a token and LoRAs on the UNet and the text encoder, always
        text_lr = config.text_encoder_lr if config.text_encoder_lr is not None else ED_LORA_TEXT_LR
        resolved = dataclasses.replace(resolved, train_text_encoder=True, text_encoder_lr=text_lr)
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
    if config.method in TOKEN_METHODS:
        check_token_options(config)
    if config.eval and config.method in CONDITIONING_METHODS:
        raise UserError(
            f"--eval scores subject adapters; for --method {config.method} run `personalize eval OUT` on a subject run"
        )
    from personalize.eval.logs import check_report_to

    check_report_to(config.report_to)  # a missing tracker package: one line now, not after the model loads
    if config.eval not in ("", "dreambench") and not Path(config.eval).expanduser().is_file():
        raise UserError(f"--eval {config.eval}: not 'dreambench' and not a prompt file (one prompt a line)")
    if len(config.adam_betas) != 2:
        raise UserError(f"adam_betas must be two numbers, e.g. [0.9, 0.999] (got {config.adam_betas})")


def check_token_options(config: TrainConfig) -> None:
    """The textual-inversion / pivotal keys."""
    if config.vectors < 1:
        raise UserError(f"--vectors must be at least 1 (got {config.vectors})")
    if config.embedding_norm_limit < 0:
        raise UserError(f"embedding_norm_limit must be 0 (off) or positive (got {config.embedding_norm_limit})")
    if config.embedding_lr is not None and config.embedding_lr <= 0:
        raise UserError(f"--embedding-lr must be positive (got {config.embedding_lr})")
    stop = config.stop_embedding_after
    if stop is not None and not 0 < stop <= 1:
        raise UserError(f"--stop-embedding-after is a fraction of the steps in (0, 1] (got {stop})")
    if config.method == "textual-inversion" and stop is not None and stop < 1:
        raise UserError(
            "--stop-embedding-after is for --method pivotal; textual-inversion trains only the token (set --steps)"
        )
    if config.method == "textual-inversion" and (config.train_text_encoder or config.quantize):
        raise UserError("--method textual-inversion trains only the new token; use --method pivotal to add an adapter")
    adapters = ["lora", "locon", "dora", "loha", "lokr", "krona", "ia3", "oft", "boft"]  # with a shared file layout
    if config.method == "ed-lora" and config.pivotal_method != "lora":
        raise UserError("--method ed-lora trains LoRAs (Mix-of-Show's ED-LoRA); --pivotal-method does not apply")
    if config.method == "pivotal" and config.pivotal_method not in adapters:
        raise UserError(
            f"pivotal_method '{config.pivotal_method}' is not an adapter method"
            f"{nearest(config.pivotal_method, adapters)}; choose one of {', '.join(adapters)}"
        )
