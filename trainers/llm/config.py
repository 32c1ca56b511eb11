"""LLMTrainConfig: every key of `personalize train --data chat.jsonl` for LLMs and VLMs.

Method-dependent defaults (rank, lr, targets, steps) are None/'' here and filled in by `resolve()`,
so the saved config.yaml holds the values actually used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from personalize.config import from_dict, nearest, option
from personalize.errors import UserError

LLM_METHODS = ("lora", "dora", "loha", "lokr", "ia3", "prompt-tuning", "prefix-tuning")
LLM_METHODS += ("adalora", "delta-lora", "increlora", "mpo", "p-tuning", "llama-adapter")
LLM_METHODS += (
    "houlsby",
    "pfeiffer",
    "compacter",
    "fish-mask",
    "child-tuning",
    "diff-pruning",
    "pasta",
    "mam",
    "fusion",
    "ladder",
    "unipelt",
)
LLM_METHODS += ("vera", "oft", "boft")
RANKED = ("lora", "dora", "loha", "lokr", "adalora", "delta-lora", "increlora")
# the default rank where 16 does not fit: IncreLoRA's is where it starts growing from
METHOD_RANK = {"increlora": 4, "vera": 256}  # VeRA: peft's default (its matrices are shared and frozen)
RANK_ONLY = ("vera",)  # a rank, no alpha
PROMPT = ("prompt-tuning", "prefix-tuning", "p-tuning", "mam", "unipelt")  # virtual tokens in the input or the cache
HOOKED = (*PROMPT, "llama-adapter", "pasta", "ladder")  # no target layers: a hook on the model / its attention layers
# method -> lr. LoRA family: the QLoRA paper's 2e-4 (arXiv 2305.14314, models up to 13B); IA3 and the
# prompt methods train a few vectors and need ~10-100x more (peft's examples: IA3 3e-3, prompt
# tuning 3e-2, prefix tuning 1e-2).
METHOD_LR = {"lora": 2e-4, "dora": 2e-4, "loha": 2e-4, "lokr": 2e-4, "ia3": 3e-3, "prompt-tuning": 3e-2}
METHOD_LR["prefix-tuning"] = 1e-2
METHOD_LR.update({"adalora": 2e-4, "delta-lora": 2e-4, "increlora": 2e-4, "mpo": 1e-4})
# P-tuning: peft's example 1e-3 (the encoder is an MLP); LLaMA-Adapter: the paper's 9e-3
METHOD_LR.update({"p-tuning": 1e-3, "llama-adapter": 9e-3})
# bottleneck adapters: 1e-4 (Houlsby et al.'s grid 3e-5..3e-3; Pfeiffer/Compacter train ~1e-4..3e-3)
METHOD_LR.update({"houlsby": 1e-4, "pfeiffer": 1e-4, "compacter": 3e-3})
# sparse selective methods train entries of the base weights: full fine-tuning's rates (FISH: 1e-4)
METHOD_LR.update({"fish-mask": 1e-4, "child-tuning": 1e-4, "diff-pruning": 1e-4})
METHOD_LR["pasta"] = 1e-2  # a few vectors, like the prompt methods
METHOD_LR["mam"] = 1e-3  # a prefix (1e-2 alone) and large FFN adapters (1e-4 alone)
METHOD_LR["fusion"] = 5e-5  # the AdapterFusion paper's
METHOD_LR["unipelt"] = 1e-3  # like mam: a prefix with LoRA and adapters
METHOD_LR["ladder"] = 3e-3  # Ladder Side-Tuning's (a randomly initialized side network)
METHOD_LR["vera"] = 3e-3  # two vectors per layer, like IA3: ~10x LoRA's rate
METHOD_LR.update({"oft": 2e-4, "boft": 2e-4})  # as the LoRA family (the diffusion recipe's choice too)


@dataclass
class LLMTrainConfig:
    model: str = option("tiny-llama", "base model: hub id, local folder with config.json, tiny-llama or tiny-llava")
    data: str = option("", "JSONL file: one conversation per line ({'messages': [...]} or {'prompt', 'completion'})")
    method: Literal[LLM_METHODS] = option(  # type: ignore[valid-type]
        "lora", "adapter method (prompt-tuning, prefix-tuning, p-tuning, mam, unipelt: language models only)"
    )
    rank: int | None = option(None, "adapter rank; None: 16 for the LoRA family, 256 for VeRA")
    alpha: float | None = option(None, "adapter alpha (scale alpha/rank); None: twice the rank (scale 2, as QLoRA)")
    targets: str = option(
        "", "layers to adapt: all-linear, attention (LLM); language, language+projector, all (VLM); or a regex"
    )
    method_options: dict[str, Any] = option({}, "extra hyperparameters for the method, e.g. {dropout: 0.05}")
    num_virtual_tokens: int = option(20, "prompt/prefix/p-tuning: number of virtual tokens")
    train_projector: bool = option(False, "VLM: also adapt the multimodal projector")
    train_vision_tower: bool = option(False, "VLM: also adapt the vision tower's attention and MLP")
    max_length: int = option(1024, "tokens per conversation (or packed row); longer ones are cut and reported")
    packing: bool = option(False, "pack several conversations into each row of max_length (LoRA family; LLMs)")
    steps: int | None = option(None, "optimizer steps; None: 3 epochs over the data")
    epochs: float = option(3.0, "used when steps is None")
    lr: float | None = option(None, "peak learning rate; None: the method's default")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = option("cosine", "learning-rate schedule after the warm-up")
    lr_warmup_steps: int = option(0, "linear warm-up steps")
    batch_size: int = option(4, "rows per micro-batch and process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "compute dtype of the frozen base; adapters fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% slower")
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = option("adamw", "adamw8bit needs bitsandbytes")
    weight_decay: float = option(0.0, "AdamW weight decay (0 as in the QLoRA paper)")
    adam_betas: list[float] = option([0.9, 0.999], "AdamW betas (torch's default)")
    adam_epsilon: float = option(1e-8, "AdamW epsilon (torch's default)")
    max_grad_norm: float = option(0.3, "gradient clipping (0.3: the QLoRA paper's value); 0: none")
    quantize: Literal["", "nf4", "fp4", "int8"] = option("", "QLoRA: load the base Linear layers 4-/8-bit; '' = off")
    checkpoint_every: int = option(100, "write a resumable checkpoint every N steps; 0: never")
    keep_checkpoints: int = option(2, "keep only the newest K checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in the output dir")
    overwrite: bool = option(False, "replace a finished (or interrupted) run in the output dir")
    cpu_threads: str = option("auto", "CPU threads: auto (1 below 50M parameters, else one per core), all, or N")
    seed: int = option(0, "seed of data order, dropout and init")
    output: str = option("", "output folder; '' = ./personalize-out/<data file name>")
    adapter_name: str = option("default", "name of the injected adapter")
    sample_prompts: list[str] = option([], "prompts answered (greedy) into samples.txt after training")
    max_new_tokens: int = option(64, "tokens per sample answer")


def resolve(config: LLMTrainConfig, rows: int | None = None) -> LLMTrainConfig:
    """Fill in method defaults and the output dir; `rows` (training rows) sets the default steps."""
    if not config.data:
        raise UserError("no training data given; pass --data chat.jsonl (one conversation per line)")
    data = Path(config.data).expanduser()
    if not data.is_file():
        raise UserError(f"--data {config.data} does not exist; pass a .jsonl file of conversations")
    default_rank = METHOD_RANK.get(config.method, 16) if config.method in (*RANKED, *RANK_ONLY) else None
    rank = config.rank if config.rank is not None else default_rank
    alpha = config.alpha if config.alpha is not None else (2.0 * rank if rank else None)
    alpha = None if config.method in RANK_ONLY else alpha
    steps = config.steps
    if steps is None and rows is not None:
        per_step = config.batch_size * config.grad_accum
        steps = max(1, math.ceil(config.epochs * rows / per_step))
    resolved = dataclasses.replace(
        config,
        data=str(data.absolute()),
        rank=rank,
        alpha=alpha,
        lr=config.lr if config.lr is not None else METHOD_LR[config.method],
        steps=steps,
        output=str(Path(config.output or Path("personalize-out") / data.stem).absolute()),
    )
    check(resolved)
    return resolved


def check(config: LLMTrainConfig) -> None:
    for key in ("batch_size", "grad_accum", "num_virtual_tokens", "max_length"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1 (got {getattr(config, key)})")
    if config.steps is not None and config.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {config.steps})")
    if config.lr is not None and config.lr <= 0:
        raise UserError(f"--lr must be positive (got {config.lr})")
    if config.method in PROMPT and config.packing:
        raise UserError(
            f"--packing cannot be used with {config.method} (the virtual tokens belong to one conversation)"
        )
    if config.method in ("prefix-tuning", "mam", "unipelt") and config.gradient_checkpointing:
        raise UserError(f"{config.method} keeps its prefixes in the cache, which gradient checkpointing disables")
    if config.method in PROMPT and config.quantize:
        raise UserError(f"--quantize is for weight adapters (QLoRA); {config.method} trains no weight of the base")
    if len(config.adam_betas) != 2:
        raise UserError(f"adam_betas must be two numbers, e.g. [0.9, 0.999] (got {config.adam_betas})")


def config_from_options(options: dict[str, Any]) -> LLMTrainConfig:
    keys = {item.name for item in dataclasses.fields(LLMTrainConfig)}
    for key in options:
        if key not in keys:
            raise UserError(f"unknown training option '{key}'{nearest(key, keys)}")
    return from_dict(LLMTrainConfig, options)
