"""Supervised instruction tuning of LLMs and VLMs with any adapter: `personalize train --data chat.jsonl`.

Reads top to bottom: read the conversations, load the base (4-bit for QLoRA), tokenize with the
chat template (loss on assistant tokens only; optional packing), inject the adapter, run the shared
accelerate loop (checkpoints, resume, progress bar), then write the adapter in the peft layout,
sample answers, config.yaml and README.md.

    from personalize.trainers.llm.sft import train
    result = train(model="tiny-llama", data="chat.jsonl", method="lora", steps=100)

QLoRA (`quantize: nf4`, arXiv 2305.14314): every Linear of the language model except lm_head is
stored 4-bit (bitsandbytes NF4); the adapters are fp32. Nothing else is upcast: RMSNorm/LayerNorm
in Llama/Qwen/CLIP compute their statistics in fp32 internally whatever their weight dtype, the
loss upcasts the logits itself, and the embeddings and lm_head stay in the load dtype (not
quantized). A blanket fp32 cast of every non-quantized weight (peft's prepare_model_for_kbit_training)
would cost memory for nothing here. VLMs keep the vision tower and projector unquantized.
"""

from __future__ import annotations

import itertools
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.bottleneck import PLACEMENTS
from personalize.adapters.frozen_linear import lean_frozen_linears
from personalize.adapters.training import CALIBRATED
from personalize.errors import UserError
from personalize.trainers.common.loop import BatchStream, LoopSettings, TrainState, raise_if_interrupted, train_loop
from personalize.trainers.common.run import DTYPES, begin_training, run_metrics, start_run, write_metrics
from personalize.trainers.common.step_memory import (
    lean_allocations_throughout,
    lean_forward_allocations,
    return_freed_memory,
)
from personalize.trainers.llm.chat_data import ChatReport, Example, collate, pack, read_conversations, tokenize
from personalize.trainers.llm.config import (
    HOOKED,
    PROMPT,
    RANK_ONLY,
    RANKED,
    LLMTrainConfig,
    config_from_options,
    resolve,
)
from personalize.trainers.llm.outputs import check_writable

VLM_UNQUANTIZED = ("lm_head", r"(.*\.)?vision_tower\..*", r"(.*\.)?multi_modal_projector\..*")


@dataclass
class LLMResult:
    output_dir: Path
    files: list[Path]
    metrics: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)


def train(config: LLMTrainConfig | None = None, **options: Any) -> LLMResult:
    """Run the recipe; `options` are LLMTrainConfig keys."""
    config = resolve(config if config is not None else config_from_options(options))
    accelerator, say, output, checkpoint_root, resume_from = start_run(config, [])
    # On a CPU every block of 256 KiB and more gets pages of its own for the whole run: the frozen layers'
    # per-layer backward temporaries would otherwise pile up in the heap (step_memory.lean_allocations_throughout)
    with lean_allocations_throughout(accelerator.device.type == "cpu"):
        return _run(config, accelerator, say, output, checkpoint_root, resume_from)


def _run(
    config: LLMTrainConfig, accelerator: Any, say: Any, output: Path, checkpoint_root: Path, resume_from: Any
) -> LLMResult:
    # --- data + base model --------------------------------------------------------------------
    report = ChatReport()
    conversations = read_conversations(config.data, report)
    # Quantizing from disk reads each weight into a buffer and frees it: mapped on their own, those buffers go
    # back to the OS at once instead of stranding in the C heap (at 0.5B that raised the peak above bf16 LoRA's)
    with lean_forward_allocations(accelerator.device.type == "cpu" and bool(config.quantize)):
        model, processor = _load(config, accelerator.device)
    return_freed_memory()
    family = "vlm" if hasattr(processor, "image_processor") else "llm"
    tokenizer = getattr(processor, "tokenizer", processor)
    if family == "vlm":
        from personalize.trainers.llm import vlm

        if config.method in PROMPT or config.packing:
            raise UserError(
                f"VLMs train with weight adapters or llama-adapter, not prompt methods, and no --packing "
                f"(got --method {config.method}{' --packing' if config.packing else ''})"
            )
        examples = vlm.build_examples(processor, conversations, config.max_length, report)
        rows = [[example] for example in examples]
        collate_rows: Any = vlm.collate_vlm
    else:
        examples = tokenize(tokenizer, conversations, config.max_length, report)
        rows = pack(examples, config.max_length) if config.packing else [[example] for example in examples]
        collate_rows = collate
    say(f"data: {report.summary()}" + (f" in {len(rows)} packed rows" if config.packing else ""))
    config = resolve(config, rows=len(rows))

    # --- adapters -----------------------------------------------------------------------------
    from personalize import adapters

    hyper = _hyperparameters(config)
    if config.method == "pasta" and "special_ids" not in hyper:  # the chat template's special tokens
        hyper["special_ids"] = sorted(set(tokenizer.all_special_ids) - {pad_id(tokenizer)})
    targets = _targets(config, family)
    if config.method == "fusion":  # the trained task adapters it attends over, named task0, task1, ...
        for name, folder in zip(hyper["adapters"], config.method_options["adapters"]):
            adapters.load_native(model, folder, name=name)
    if "drop_below" in config.method_options:  # AdapterDrop: no adapters in the lowest layers
        from personalize.adapters.bottleneck import adapter_drop_targets

        targets = adapter_drop_targets(model, targets or "all-linear", int(config.method_options["drop_below"]))
    adapters.inject(model, config.method, targets=targets, name=config.adapter_name, **hyper)
    check_writable(model, config.method, config.adapter_name)  # a layout peft cannot hold fails before training
    pad = pad_id(tokenizer)
    if config.method in CALIBRATED:  # FISH mask / Child-Tuning_D: the Fisher information picks the entries
        count = int(config.method_options.get("calibration_batches", 8))
        calibration = itertools.islice(RowBatches(rows, config.batch_size, config.seed, collate_rows, pad), count)
        device = next(model.parameters()).device
        adapters.calibrate(model, lambda b: model(**{k: v.to(device) for k, v in b.items()}).loss, calibration)
    named = {name: param for name, param in model.named_parameters() if param.requires_grad}
    for param in named.values():  # what trains is fp32, whatever the base is
        param.data = param.data.float()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # --- optimizer, schedule, loop state ------------------------------------------------------
    from personalize.trainers.common.optim import build_lr_scheduler, build_optimizer

    optimizer = build_optimizer(
        config.optimizer,
        [{"params": list(named.values())}],
        lr=config.lr,  # type: ignore[arg-type]
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    adapters.follow_optimizer(model, optimizer)  # AdaLoRA's rank allocation, IncreLoRA's growth
    lr_scheduler = build_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, config.steps)  # type: ignore[arg-type]
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(config.seed * 1_000 + accelerator.process_index)
    stream = BatchStream(
        lambda epoch: RowBatches(rows, config.batch_size, config.seed + epoch, collate_rows, pad),
        accelerator.process_index,
        accelerator.num_processes,
    )
    state = TrainState(named, optimizer, lr_scheduler, stream, generator)
    begin_training(accelerator, state, resume_from, config, output, say)
    trainable = sum(param.numel() for param in named.values())
    say(f"{config.method} on {config.model} ({family}): {trainable:,} trainable parameters, {config.steps} steps")

    # --- train --------------------------------------------------------------------------------
    device = accelerator.device

    def compute_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = model(**batch, use_cache=False).loss
        penalty = adapters.regularization(model)  # AdaLoRA / IncreLoRA orthogonality
        return (loss if penalty is None else loss + penalty), {}

    started = time.perf_counter()
    settings = LoopSettings.from_config(config, checkpoint_root)
    model.train()
    # On a CPU the frozen Linear layers keep no input for backward and compute their input gradient where
    # the CPU is fast (fp32 on one without native bf16: 5-9x less fwd+bwd time per layer; adapters.frozen_linear)
    with lean_frozen_linears(model, enabled=device.type == "cpu"):
        train_loop(accelerator, [model], compute_loss, state, settings)
    adapters.finish(model)  # Diff-Pruning: keep its top-density entries
    seconds = time.perf_counter() - started
    model.eval()

    # --- outputs ------------------------------------------------------------------------------
    base = accelerator.unwrap_model(model)
    metrics = {**run_metrics(state, seconds), "data": report.summary()}
    files: list[Path] = []
    samples: dict[str, str] = {}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = save_adapter(output, base, config, family)
        if not state.stopped_early:
            samples = _samples(base, processor, config, conversations, output)
            files.append(output / "samples.txt")
        from personalize.trainers.llm.card import render_llm_card

        (output / "README.md").write_text(render_llm_card(config, family, files, metrics, samples))
        files += [output / "README.md", output / "config.yaml", write_metrics(output, metrics, state)]
        say(f"done in {seconds:.0f} s; final loss {metrics['final_loss']:.4f}; wrote:")
        for path in files:
            say(f"  {path}")
    accelerator.wait_for_everyone()
    if accelerator.device.type != "cpu":  # on CPU only a full gc.collect() would run: seconds, for nothing
        accelerator.free_memory()
    raise_if_interrupted(state, output, config.steps)
    return LLMResult(output, files, metrics, samples)


# --- pieces of the recipe ----------------------------------------------------------------------


class RowBatches:
    """One epoch of batches: rows shuffled with `seed` (the same order for the same epoch)."""

    def __init__(self, rows: Sequence[Sequence[Example]], batch_size: int, seed: int, collate_rows: Any, pad: int):
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        self.batches = [[rows[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
        self.collate_rows = collate_rows
        self.pad = pad

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        return (self.collate_rows(batch, self.pad) for batch in self.batches)


def _load(config: LLMTrainConfig, device: Any) -> tuple[Any, Any]:
    """The base model (frozen, 4-/8-bit when asked) and its tokenizer or processor."""
    from personalize.models import TINY_LANGUAGE, load_language_model

    dtype = DTYPES[config.mixed_precision]
    kwargs: dict[str, Any] = {}
    # On a GPU, transformers' bitsandbytes loader quantizes each weight as it reaches the device. On a CPU it
    # reads the weights through the checkpoint's memory map, so every page stays resident until loading
    # ends (the peak holds the full-precision model); there the model loads lazily and each Linear weight
    # is read from the file into its own buffer and quantized (personalize.models.mapped).
    hub_quantized = bool(config.quantize) and config.model not in TINY_LANGUAGE and device.type != "cpu"
    if hub_quantized:
        try:
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise UserError("--quantize needs bitsandbytes: pip install 'personalize[quant]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=config.quantize in ("nf4", "fp4"),
            load_in_8bit=config.quantize == "int8",
            bnb_4bit_quant_type=config.quantize if config.quantize in ("nf4", "fp4") else "nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=["lm_head", "vision_tower", "multi_modal_projector"],
        )
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes as the weights reach the device
    from_disk = bool(config.quantize) and not hub_quantized and config.model not in TINY_LANGUAGE
    # From disk: the checkpoint's own dtype keeps every weight a lazy memory map until it is read.
    load_dtype = "auto" if from_disk else dtype
    model, processor = load_language_model(config.model, torch_dtype=load_dtype, **kwargs)
    model.requires_grad_(False)
    if config.quantize and not hub_quantized:
        from personalize import adapters
        from personalize.models.mapped import tensor_reader

        reader = tensor_reader(model) if from_disk else None
        adapters.quantize(model, config.quantize, skip=VLM_UNQUANTIZED, compute_dtype=dtype, read_weight=reader)
        _keep_cpu_4bit_layout(model)
        _cast_unquantized(model, dtype)
    return model, processor


def _cast_unquantized(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The parameters quantize() kept (embeddings, norms, lm_head, biases, a VLM's vision tower and
    projector) in the compute dtype; buffers (rotary frequencies) keep theirs."""
    for param in model.parameters():
        quantized = type(param).__name__ in ("Params4bit", "Int8Params")
        if not quantized and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _keep_cpu_4bit_layout(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on the first no-grad eval forward,
    which fails for rows shorter than one quantization block (in_features % blocksize != 0, e.g. tiny
    models); those layers keep the standard layout (the training kernels read it anyway)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        blocksize = getattr(weight, "blocksize", None)
        if blocksize and hasattr(module, "support_avx512bf16_for_cpu") and module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _hyperparameters(config: LLMTrainConfig) -> dict[str, Any]:
    hyper: dict[str, Any] = {}
    if config.method in RANKED:
        hyper.update(rank=config.rank, alpha=config.alpha)
    if config.method in RANK_ONLY:
        hyper.update(rank=config.rank, seed=config.seed)  # VeRA: its shared matrices are drawn from the seed
    if config.method == "adalora":
        hyper["total_steps"] = config.steps  # the rank budget's schedule ends there
    if config.method in PROMPT:
        hyper["num_virtual_tokens"] = config.num_virtual_tokens
    # drop_below picks targets, calibration_batches feeds the Fisher information: neither is a module option
    hyper.update({k: v for k, v in config.method_options.items() if k not in ("drop_below", "calibration_batches")})
    if config.method == "boft":
        hyper.setdefault("stages", 1)  # peft's layout holds one butterfly stage (boft_n_butterfly_factor 1)
    if config.method == "fusion":
        folders = config.method_options.get("adapters") or []
        if not isinstance(folders, list) or len(folders) < 2:
            raise UserError(
                "--method fusion needs method_options={adapters: [DIR1, DIR2]}: trained bottleneck adapters"
            )
        hyper["adapters"] = [f"task{index}" for index in range(len(folders))]
    return hyper


def _targets(config: LLMTrainConfig, family: str) -> str | None:
    if config.method in HOOKED or (config.method == "fusion" and not config.targets):
        return None  # hooks of their own; AdapterFusion: the layers of its task adapters
    if config.targets:
        return config.targets
    if config.method in PLACEMENTS:  # bottleneck adapters: after the output projections, LLM or VLM
        return PLACEMENTS[config.method]
    if config.method == "boft" and family == "llm":  # FFN widths such as 11008 = 43 x 2^8 split into no
        return "attention"  # even block <= 32 times a power of two; peft's BOFT examples adapt attention too
    if family == "vlm":
        from personalize.trainers.llm.vlm import vlm_targets

        return vlm_targets(config.train_projector, config.train_vision_tower)
    return "all-linear"


def save_adapter(output: Path, model: Any, config: LLMTrainConfig, family: str) -> list[Path]:
    """THE place that writes the trained adapter (peft layout; switch to personalize.formats here)."""
    from personalize import adapters
    from personalize.trainers.llm.outputs import save_adapter as write_peft

    sd = adapters.state_dict(model, config.adapter_name)
    hyper = _hyperparameters(config)
    if config.method == "pasta":  # the ids chosen from the tokenizer at training time
        from personalize.adapters.prompt import registry

        hyper["special_ids"] = registry(model)[config.adapter_name].special_ids.tolist()
    files = write_peft(
        output, model, sd, method=config.method, hyper=hyper, base_model=config.model, name=config.adapter_name
    )
    if config.method == "fusion":  # the task adapters travel with the fusion weights
        from personalize.adapters.native import NATIVE_FILE

        for name, folder in zip(hyper["adapters"], config.method_options["adapters"]):
            (output / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder) / NATIVE_FILE, output / name / NATIVE_FILE)
            files.append(output / name / NATIVE_FILE)
    return files


def _samples(
    model: Any, processor: Any, config: LLMTrainConfig, conversations: Sequence[Any], output: Path
) -> dict[str, str]:
    """Greedy answers to the sample prompts (default: the first user turns of the data) -> samples.txt."""
    from personalize.pipelines.text import generate_text, read_image

    prompts = list(config.sample_prompts)
    images: list[Any] = [None] * len(prompts)
    if not prompts:
        for conversation in conversations:
            if len(prompts) == 3:
                break
            try:  # conversations whose image did not decode were skipped in training, and here
                image = read_image(conversation.images[0]) if conversation.images else None
            except UserError:
                continue
            first = next(m["content"] for m in conversation.messages if m["role"] == "user")
            prompts.append(first.replace("<image>", "").strip())
            images.append(image)
    answers = {}
    for prompt, image in zip(prompts, images):
        answers[prompt] = generate_text(model, processor, prompt, max_new_tokens=config.max_new_tokens, image=image)
    text = "".join(f"### {prompt}\n{answer}\n\n" for prompt, answer in answers.items())
    (output / "samples.txt").write_text(text)  # greedy answers, one section per prompt
    return answers


def options_summary(config: LLMTrainConfig) -> dict[str, Any]:
    keys = ("method", "rank", "alpha", "targets", "steps", "lr", "lr_scheduler", "batch_size", "grad_accum")
    keys += ("max_length", "packing", "mixed_precision", "quantize", "gradient_checkpointing", "seed")
    return {key: getattr(config, key) for key in keys} | {"method_options": config.method_options or ""}


__all__ = ["LLMResult", "LLMTrainConfig", "train"]
