"""Our LLM trainer vs a plain peft + transformers loop: seconds per step and peak memory, LoRA and QLoRA.

    python -m benchmarks.llm [--steps 6] [--seq 256] [--batch 2] [--device cpu|cuda] [--threads 2]
        [--ours-set cpu_allocator=default ...]   (a string option of our trainer, e.g. to turn a choice off)

The model is a Llama-architecture causal LM of ~100M parameters with random weights (hidden 768,
12 layers, MLP 2048, vocabulary 16000), saved once to a temporary folder with a chat-template
tokenizer. Both sides train LoRA rank 16 / alpha 32 on every linear layer except lm_head with AdamW
(lr 2e-4) on the same batches (our chat-data pipeline's collated rows); QLoRA holds the base in NF4
with double quantization (peft side: transformers' BitsAndBytesConfig and the documented
prepare_model_for_kbit_training, without gradient checkpointing; ours: the same loader on a GPU, its
own from-disk quantization on a CPU). Each run is its own process, so peak RSS (CPU) or peak allocated
CUDA memory is its own. The first step is warm-up and not timed (ours: the loop time of an N+1-step
run minus that of a 1-step run, in two processes).

Seen on the 2-core CPU dev machine (quiet), `--steps 8 --seq 64 --batch 1 --device cpu --dtype bf16`,
100M parameters, bf16 base for LoRA, NF4 + bf16 compute for QLoRA; "above imports" is the peak RSS
minus the RSS once torch, transformers, peft, bitsandbytes and personalize are imported (the CPU
analogue of peak allocated CUDA memory); s/step varies about 10% between runs, "above imports" for
QLoRA 0.35-0.50 GiB (ours) and 0.50-0.60 GiB (peft):

| mode | trainer | s/step | peak RSS GiB | above imports GiB |
| --- | --- | --- | --- | --- |
| lora | peft | 0.220 | 0.95 | 0.57 |
| lora | ours | 0.227 | 0.95 | 0.57 |
| qlora | peft | 0.303 | 0.91 | 0.53 |
| qlora | ours | 0.223 | 0.86 | 0.48 |

Our QLoRA run reads each Linear weight from the checkpoint into its own buffer before quantizing it
(transformers' CPU path reads them through the memory map, whose pages stay resident until loading
ends) and quantizes from bf16, so that each layer dequantizes straight into the compute dtype (from
fp32 it cost a cast per layer and pass: 0.37 s/step). QLoRA / bf16 LoRA above imports: 0.61x-0.88x
over runs -- at 100M parameters the optimizer, LoRA factors, dequantization buffers and allocator
overhead weigh as much as the weights; the 0.5x target is for `--device cuda` (peak allocated memory)
and bigger models, not measured here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RANK, ALPHA, LR = 16, 32, 2e-4


def build_model_folder(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from personalize.models.tiny_tokenizers import tiny_llama_tokenizer

    tokenizer = tiny_llama_tokenizer(max_length=4096)
    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(path: Path, rows: int, seq: int) -> Path:
    """Conversations of about `seq` tokens (words the tiny tokenizer knows)."""
    words = "the cat is on a red car and the dog is in the blue house with a small tree".split()  # noqa: SIM905
    lines = []
    for index in range(rows):
        body = " ".join(words[(index + k) % len(words)] for k in range(seq // 3))
        lines.append(json.dumps({"prompt": f"question {index}: {body}", "completion": f"answer: {body}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def peak_memory(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def run_ours(folder: Path, data: Path, mode: str, args: argparse.Namespace) -> dict:
    """One run of `args.ours_steps` steps (the parent runs 1 and steps + 1, each in its own process, so that
    the peak memory is one run's and the difference of their loop times is the steps after the first)."""
    from personalize.trainers.llm.sft import train

    out = Path(tempfile.mkdtemp())
    options = dict(model=str(folder), data=str(data), rank=RANK, alpha=ALPHA, lr=LR, batch_size=args.batch)
    options.update(max_length=args.seq * 2, checkpoint_every=0, sample_prompts=["hi"], max_new_tokens=1)
    options.update(lr_scheduler="constant", max_grad_norm=0.0, quantize="nf4" if mode == "qlora" else "")
    options.update(mixed_precision="bf16" if args.dtype == "bf16" else "no")
    options.update(setting.split("=", 1) for setting in args.ours_set)
    result = train(steps=args.ours_steps, output=str(out / "run"), **options)
    return {"seconds": result.metrics["seconds"]}


def run_peft(folder: Path, data: Path, mode: str, args: argparse.Namespace) -> dict:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from personalize.trainers.llm.chat_data import collate, read_conversations, tokenize

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    kwargs: dict = {"dtype": dtype}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if mode == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    examples = tokenize(tokenizer, read_conversations(data), args.seq * 2)
    rows = [[example] for example in examples]
    batches = [collate(rows[i : i + args.batch], tokenizer.pad_token_id) for i in range(0, len(rows), args.batch)]
    model.train()
    times = []
    for step in range(args.steps + 1):
        batch = {k: v.to(args.device) for k, v in batches[step % len(batches)].items()}
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=args.dtype == "bf16"):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"s_per_step": sum(times[1:]) / args.steps}


def current_rss_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    folder, data = Path(args.folder), Path(args.data)
    import bitsandbytes  # noqa: F401  -- every library imported before the baseline, on both sides
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import personalize.trainers.llm.sft  # noqa: F401

    baseline = current_rss_gib() if args.device == "cpu" else 0.0
    runner = run_ours if args.impl == "ours" else run_peft
    result = runner(folder, data, args.mode, args)
    result["peak_gib"] = peak_memory(args.device)
    result["above_gib"] = result["peak_gib"] - baseline  # CPU: what the run added to the imported libraries
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256, help="about this many tokens per conversation")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--modes", default="lora,qlora")
    parser.add_argument("--ours-set", action="append", default=[], help="an extra KEY=VALUE option for our side")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--ours-steps", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp())
    folder = build_model_folder(work / "llama-100m")
    data = write_data(work / "chat.jsonl", rows=args.batch * (args.steps + 2), seq=args.seq)
    from safetensors.torch import load_file

    params = sum(p.numel() for p in load_file(str(folder / "model.safetensors")).values())
    print(
        f"Llama-architecture model, {params / 1e6:.0f}M parameters, random weights; device {args.device}; "
        f"batch {args.batch} x ~{args.seq * 2} tokens; {args.steps} timed steps\n"
    )
    memory = "peak CUDA GiB" if args.device == "cuda" else "peak RSS GiB | above imports GiB"
    rule = "| --- | --- | --- | --- |" + (" --- |" if args.device == "cpu" else "")
    print(f"LoRA base and compute dtype: {args.dtype}\n| mode | trainer | s/step | {memory} |\n{rule}", flush=True)
    for mode in args.modes.split(","):
        for impl in ("peft", "ours"):
            runs = [1, args.steps + 1] if impl == "ours" else [args.steps + 1]
            results = [child_run(impl, mode, steps, folder, data, args) for steps in runs]
            if any(result is None for result in results):
                continue
            result = results[-1]
            if impl == "ours":
                result["s_per_step"] = (results[1]["seconds"] - results[0]["seconds"]) / args.steps
            above = f" {result['above_gib']:.2f} |" if args.device == "cpu" else ""
            print(f"| {mode} | {impl} | {result['s_per_step']:.3f} | {result['peak_gib']:.2f} |{above}", flush=True)


def child_run(impl: str, mode: str, steps: int, folder: Path, data: Path, args: argparse.Namespace) -> dict | None:
    """One (trainer, mode) run in a fresh process; its RESULT line, or None (and the error) if it failed."""
    command = [sys.executable, "-m", "benchmarks.llm", "--child", "--impl", impl, "--mode", mode]
    command += ["--ours-steps", str(steps), "--folder", str(folder), "--data", str(data), "--steps", str(args.steps)]
    command += ["--seq", str(args.seq), "--batch", str(args.batch), "--device", args.device]
    command += ["--threads", str(args.threads), "--dtype", args.dtype]
    command += [f"--ours-set={setting}" for setting in args.ours_set]
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"{impl} {mode} failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(line[len("RESULT ") :])


if __name__ == "__main__":
    main()
