"""Seconds per training step and peak memory: `personalize train` against diffusers' DreamBooth-LoRA script.

Same pipeline (SD1.5 architecture, random weights, saved locally by benchmarks.sd15_arch), same
settings: 256 px square center crops, batch 1, LoRA rank 4 (alpha 4) on attention to_q/k/v/out.0,
fp32, no validation, no checkpoints. Each trainer runs twice, for W and W + N steps, in fresh
processes; seconds per step = (T(W + N) - T(W)) / N, which cancels loading, caching and saving.
Peak memory: the child's max RSS (CPU) or torch.cuda.max_memory_allocated (GPU), the larger of
its two runs. Runs are interleaved (ours, theirs, ours, theirs) so that load drifts hit both.

    python -m benchmarks.train_step --peer-script PATH/train_dreambooth_lora.py [--peer-python PY]
        [--steps 8] [--warmup 2] [--quantize nf4] [--workdir benchmarks/.cache/train]
        [--ours-set release_memory=never --ours-set cpu_conv=onednn ...]   (our step-memory choices, one by one)

diffusers' script comes from a fetched diffusers repository (examples/dreambooth/); it imports
torchvision, so on a CPU-only torch 2.13 machine run it from its own venv (--peer-python).
Without --peer-script only our side is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "cat"
PROMPT = "a photo of sks cat"
PEER = "diffusers train_dreambooth_lora.py"

# Runs `python -c MEASURE <kind> <argv...>` in a fresh process: the trainer in-process, then its peak memory.
MEASURE = r"""
import json, resource, runpy, sys, time
kind, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
try:
    if kind == "ours":
        sys.argv = ["personalize", *argv]
        runpy.run_module("personalize", run_name="__main__")
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
except SystemExit as exit_:
    if exit_.code not in (None, 0):
        raise
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:
    import torch
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
except ImportError:
    pass
print("MEASURED " + json.dumps({"seconds": seconds, "peak_bytes": peak}))
"""


def ours_argv(model: Path, out: Path, steps: int, args: argparse.Namespace, quantize: str) -> list[str]:
    argv = ["train", "--model", str(model), "--images", str(IMAGES), "--method", "lora", "--rank", "4"]
    argv += ["--alpha", "4", "--targets", "attention", "--resolution", str(args.resolution), "--batch-size", "1"]
    argv += ["--steps", str(steps), "--lr", "1e-4", "--mixed-precision", "no", "--checkpoint-every", "0"]
    argv += ["--output", str(out), "--seed", "0", "--set", "validation_images=0", "--set", "data.bucketing=false"]
    argv += ["--set", f"data.cache_dir={args.workdir / 'cache'}", "--set", "data.num_workers=0"]
    if quantize:
        argv += ["--quantize", quantize]
    for setting in args.ours_set:
        argv += ["--set", setting]
    return argv


def peer_argv(model: Path, out: Path, steps: int, args: argparse.Namespace, quantize: str = "") -> list[str]:
    return [
        str(args.peer_script),
        f"--pretrained_model_name_or_path={model}",
        f"--instance_data_dir={IMAGES}",
        f"--instance_prompt={PROMPT}",
        f"--output_dir={out}",
        f"--resolution={args.resolution}",
        "--center_crop",
        "--train_batch_size=1",
        "--rank=4",
        f"--max_train_steps={steps}",
        "--learning_rate=1e-4",
        "--mixed_precision=no",
        f"--checkpointing_steps={10 * (steps + 1)}",
        "--seed=0",
        "--dataloader_num_workers=0",
    ]


def measure(python: str, kind: str, argv: list[str], env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run([python, "-c", MEASURE, kind, *argv], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("MEASURED ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "train")
    parser.add_argument("--model", type=Path, default=None, help="a saved pipeline (default: SD1.5 arch, random)")
    parser.add_argument("--peer-script", type=Path, default=None)
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--quantize", default="", help="also measure ours with a quantized base (nf4, ...)")
    parser.add_argument("--ours-set", action="append", default=[], help="an extra --set KEY=VALUE for our side")
    parser.add_argument("--threads", type=int, default=0, help="OMP/torch threads (0: leave as is)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from benchmarks.sd15_arch import save_sd15_pipeline

        model = save_sd15_pipeline(args.workdir / "sd15-random")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    # (name, python, kind, quantize)
    sides = [("personalize", sys.executable, "ours", "")]
    if args.quantize:
        sides.append((f"personalize --quantize {args.quantize}", sys.executable, "ours", args.quantize))
    if args.peer_script:
        sides.append((PEER, args.peer_python, "peer", ""))
    results: dict[str, list[dict[str, float]]] = {side[0]: [] for side in sides}
    for steps in (args.warmup, args.warmup + args.steps):
        for name, python, kind, quantize in sides:
            out = args.workdir / f"{kind}-{quantize or 'fp32'}-{steps}"
            build = ours_argv if kind == "ours" else peer_argv
            started = time.perf_counter()
            results[name].append(measure(python, kind, build(model, out, steps, args, quantize), env))
            print(f"{name:40s} {steps:3d} steps: {time.perf_counter() - started:7.1f} s", flush=True)

    print(f"\n{args.resolution} px, batch 1, LoRA rank 4 on attention, fp32, {args.steps} steps after {args.warmup}")
    print(f"{'trainer':40s} {'s/step':>8s} {'peak MB':>9s} {'step vs peer':>13s} {'mem vs peer':>12s}")
    peer = PEER
    table = {}
    for name, runs in results.items():
        step = (runs[1]["seconds"] - runs[0]["seconds"]) / args.steps
        peak = max(run["peak_bytes"] for run in runs) / 2**20
        table[name] = (step, peak)
    for name, (step, peak) in table.items():
        ratio_step = f"{step / table[peer][0]:.2f}x" if peer in table else "-"
        ratio_mem = f"{peak / table[peer][1]:.2f}x" if peer in table else "-"
        print(f"{name:40s} {step:8.3f} {peak:9.0f} {ratio_step:>13s} {ratio_mem:>12s}")


if __name__ == "__main__":
    main()
