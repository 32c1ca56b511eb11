"""QLoRA at a size where it matters: Llama-architecture models of ~0.5B and ~1.5B parameters.

    nice -n 10 python -m benchmarks.qlora_size [--sizes 0.5b,1.5b] [--repeats 3] [--steps 2] [--seq 64]

Each model is a random-init `LlamaForCausalLM` built from the config below in code (no download), saved
once in bf16 to a temporary folder with a chat-template tokenizer. Four runs per size and repeat, each
in its own process (so that each peak is its own), one at a time, in this order:

    ours lora   our trainer, bf16 base and compute, LoRA r16/alpha 32 on every Linear but lm_head
    ours qlora  the same with the base's Linear layers in NF4 (double quantization), bf16 compute
    peft lora   transformers' from_pretrained (bf16) + peft.get_peft_model + a plain AdamW loop
    peft qlora  transformers' BitsAndBytesConfig(nf4, double quant, bf16 compute) +
                peft.prepare_model_for_kbit_training (its documented QLoRA recipe) + the same loop

All four use gradient checkpointing (non-reentrant) and AdamW lr 2e-4 on the same batches (our
chat-data pipeline's collated rows). A step is forward + backward + optimizer step; the first is
warm-up, the next `--steps` are timed (ours: the time between optimizer steps, read by a global
optimizer hook; peft: around each step of its loop), in wall-clock seconds and in the process's CPU
seconds (all threads; steadier than wall time on a machine shared with other jobs). Memory is the CPU
analogue of peak allocated CUDA memory: peak RSS minus the RSS once torch, transformers, peft,
bitsandbytes and personalize are imported ("above imports"). The table gives the median of the repeats with [min, max].
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.llm import ALPHA, LR, RANK, current_rss_gib, peak_memory, write_data

# name -> (hidden, layers, MLP, heads, kv heads); vocabulary 32000 (Llama 2's), untied lm_head
SIZES = {"0.5b": (1536, 16, 4096, 12, 4), "1.5b": (2048, 30, 5632, 16, 4)}
RUNS = (("ours", "lora"), ("ours", "qlora"), ("peft", "lora"), ("peft", "qlora"))


def build_model_folder(folder: Path, size: str) -> int:
    """Random-init Llama of `size` saved in bf16 (built in bf16: no fp32 copy of 1.5B weights); its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from personalize.models.tiny_tokenizers import tiny_llama_tokenizer

    hidden, layers, mlp, heads, kv_heads = SIZES[size]
    tokenizer = tiny_llama_tokenizer(max_length=4096)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    count = sum(param.numel() for param in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return count


def run_ours(folder: Path, data: Path, mode: str, args: argparse.Namespace) -> dict:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from personalize.trainers.llm.sft import train

    stamps: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(lambda *_: stamps.append((time.perf_counter(), time.process_time())))
    options = dict(model=str(folder), data=str(data), rank=RANK, alpha=ALPHA, lr=LR, batch_size=args.batch)
    options.update(max_length=args.seq * 2, checkpoint_every=0, sample_prompts=["hi"], max_new_tokens=1)
    options.update(lr_scheduler="constant", max_grad_norm=0.0, quantize="nf4" if mode == "qlora" else "")
    options.update(mixed_precision="bf16", gradient_checkpointing=True, cpu_threads=str(args.threads))
    out = Path(tempfile.mkdtemp())
    try:
        train(steps=args.steps + 1, output=str(out / "run"), **options)
    finally:
        shutil.rmtree(out)  # the adapter (tens of MB at these sizes) is not what is measured
    steps = len(stamps) - 1  # the intervals after the first step (warm-up)
    wall, cpu = (stamps[-1][k] - stamps[0][k] for k in (0, 1))
    return {"s_per_step": wall / steps, "cpu_s_per_step": cpu / steps}


def run_peft(folder: Path, data: Path, mode: str, args: argparse.Namespace) -> dict:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from personalize.trainers.llm.chat_data import collate, read_conversations, tokenize

    kwargs: dict = {"dtype": torch.bfloat16}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    checkpointing = {"use_reentrant": False}
    if mode == "qlora":
        model = peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=checkpointing)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    examples = tokenize(tokenizer, read_conversations(data), args.seq * 2)
    rows = [[example] for example in examples]
    batches = [collate(rows[i : i + args.batch], tokenizer.pad_token_id) for i in range(0, len(rows), args.batch)]
    model.train()
    times, cpu_times = [], []
    for step in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batches[step % len(batches)], use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"s_per_step": sum(times[1:]) / args.steps, "cpu_s_per_step": sum(cpu_times[1:]) / args.steps}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  -- every library imported before the baseline, on both sides
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import personalize.trainers.llm.sft  # noqa: F401

    baseline = current_rss_gib()
    runner = run_ours if args.impl == "ours" else run_peft
    result = runner(Path(args.folder), Path(args.data), args.mode, args)
    result["above_gib"] = peak_memory("cpu") - baseline
    print("RESULT " + json.dumps(result), flush=True)


def child_run(impl: str, mode: str, folder: Path, data: Path, args: argparse.Namespace) -> dict | None:
    command = [sys.executable, "-m", "benchmarks.qlora_size", "--child", "--impl", impl, "--mode", mode]
    command += ["--folder", str(folder), "--data", str(data), "--steps", str(args.steps), "--seq", str(args.seq)]
    command += ["--batch", str(args.batch), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{impl} {mode} failed:\n{done.stderr[-2000:]}", flush=True)
        return None
    return json.loads(line[len("RESULT ") :])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5b,1.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--seq", type=int, default=64, help="about this many tokens per conversation")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=",".join(f"{impl}-{mode}" for impl, mode in RUNS), help="e.g. ours-qlora")
    parser.add_argument("--models", default="", help="keep the built models here and reuse them (default: temporary)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp())
    data = write_data(work / "chat.jsonl", rows=args.batch * (args.steps + 2), seq=args.seq)
    chosen = [tuple(run.split("-")) for run in args.runs.split(",")]
    for size in args.sizes.split(","):
        folder = Path(args.models or work) / size
        if (folder / "model.safetensors").is_file():
            count = sum(p.numel() for p in load_file(str(folder / "model.safetensors")).values())
        else:
            count = build_model_folder(folder, size)
        print(f"\n{size}: {count / 1e9:.2f}B parameters; batch {args.batch} x ~{args.seq * 2} tokens", flush=True)
        results: dict[tuple[str, str], list[dict]] = {run: [] for run in chosen}
        for repeat in range(args.repeats):
            for impl, mode in chosen:
                result = child_run(impl, mode, folder, data, args)
                if result is not None:
                    results[impl, mode].append(result)
                    print(f"  repeat {repeat}: {impl} {mode} {json.dumps(result)}", flush=True)
        print("| trainer | mode | s/step | CPU s/step | above imports GiB |\n| --- | --- | --- | --- | --- |")
        for (impl, mode), runs in results.items():
            if runs:
                columns = [spread([r[key] for r in runs]) for key in ("s_per_step", "cpu_s_per_step", "above_gib")]
                print(f"| {impl} | {mode} | {' | '.join(columns)} |")
        ours_q, ours_l = results.get(("ours", "qlora"), []), results.get(("ours", "lora"), [])
        peft_q = results.get(("peft", "qlora"), [])
        if ours_q and ours_l and peft_q:
            memory = [q["above_gib"] / lo["above_gib"] for q, lo in zip(ours_q, ours_l)]
            print(f"ours QLoRA / ours bf16 LoRA memory: {spread(memory)} (goal <= 0.5)")
            for key in ("s_per_step", "cpu_s_per_step"):
                ratio = [q[key] / p[key] for q, p in zip(ours_q, peft_q)]
                print(f"ours QLoRA / peft QLoRA {key}: {spread(ratio)} (goal <= 1.0)", flush=True)
        if not args.models:  # 1-3 GB of weights: not left in /tmp
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
