"""Seconds per step and peak memory on SD3 / Flux: `personalize train` against diffusers' DreamBooth-LoRA scripts.

Same pipelines (reduced-depth, real-width random-init builds from personalize.models.tiny_flow: FLUX.1-dev's
width with 1 double + 1 single block, SD3.5-medium's width with 2 blocks), saved locally; same settings:
256 px center crops, batch 1, LoRA rank 4 (alpha 4) on each family's reference targets (Flux: attention +
feed-forward, SD3: attention), cached latents on both sides, no validation, no checkpoints; fp32 and bf16.
Also ours with `--quantize nf4` (bf16) against the reference's bf16 peak, and LoKr / KronA against our LoRA
at the same targets (fp32). Each run is one fresh process of `--steps` optimizer steps; a global optimizer-step hook
(torch.optim's register_optimizer_step_post_hook, the same on both sides) stamps the end of every step, and
s/step is the median of the intervals after the first step (loading, caching and the first step's one-time
costs fall outside). Peak memory: the child's VmHWM (peak RSS; CPU) or torch.cuda.max_memory_allocated (GPU).

    python -m benchmarks.flow_step --peer-dir DIFFUSERS/examples/dreambooth --peer-python VENV/bin/python
        [--families flux sd3] [--precisions no bf16] [--steps 3] [--repeats 3]

The reference scripts import torchvision: run them from their own venv (--peer-python).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import train_step
from benchmarks.train_step import IMAGES, ROOT

SCRIPTS = {"flux": "train_dreambooth_lora_flux.py", "sd3": "train_dreambooth_lora_sd3.py"}
# The reference scripts' default targets. Flux: attention + feed-forward (our "attention+ff" preset selects the same
# layers). SD3: attn.* only; peft matches by '.'-suffix, so SD3.5's second attention (attn2) keeps none, and our
# "attention" preset (attn and attn2) would train more: the same layers as a regex.
TARGETS = {
    "flux": "attention+ff",
    "sd3": r"(.*\.)?attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
}
# T5 tokens: ours takes the pipelines' max_sequence_length (Flux 512, SD3 256); the SD3 script's default is 77
PEER_SEQUENCE = {"flux": 512, "sd3": 256}


def save_models(workdir: Path, families: list[str]) -> dict[str, Path]:
    from personalize.models.tiny_flow import reduced_flux, reduced_sd3

    builders = {"flux": lambda: reduced_flux(1, 1), "sd3": lambda: reduced_sd3(2)}
    folders = {}
    for family in families:
        folder = workdir / f"{family}-reduced"
        if not (folder / "model_index.json").is_file():
            builders[family]().save_pretrained(folder)
        folders[family] = folder
    return folders


def ours_argv(family: str, model: Path, out: Path, steps: int, precision: str, args: argparse.Namespace, method: str,
              quantize: str) -> list[str]:  # fmt: skip
    argv = ["train", "--model", str(model), "--images", str(IMAGES), "--method", method, "--targets", TARGETS[family]]
    if method in ("lora", "lokr"):
        argv += ["--rank", "4", "--alpha", "4"]
    argv += ["--resolution", str(args.resolution), "--batch-size", "1", "--steps", str(steps), "--lr", "1e-4"]
    argv += ["--mixed-precision", precision, "--checkpoint-every", "0", "--output", str(out), "--seed", "0"]
    argv += ["--overwrite"]
    argv += ["--set", "validation_images=0", "--set", "data.bucketing=false", "--set", "data.num_workers=0"]
    argv += ["--set", f"data.cache_dir={args.workdir / 'cache'}", "--token", "sks", "--class-word", "cat"]
    return argv + (["--quantize", quantize] if quantize else [])


def peer_argv(family: str, model: Path, out: Path, steps: int, precision: str, args: argparse.Namespace) -> list[str]:
    """The SD1.5 benchmark's reference arguments with the family's script, this precision, alpha 4, cached latents."""
    script = argparse.Namespace(peer_script=args.peer_dir / SCRIPTS[family], resolution=args.resolution)
    shared = train_step.peer_argv(model, out, steps, script)
    argv = [f"--mixed_precision={precision}" if a == "--mixed_precision=no" else a for a in shared]
    # the SD3 script's latent caching sends bf16 pixels into its fp32 VAE and fails ("Input type (c10::BFloat16)
    # and bias type (float) should be the same"): its bf16 runs encode every step instead
    caching = [] if (family == "sd3" and precision == "bf16") else ["--cache_latents"]
    argv += [*caching, f"--max_sequence_length={PEER_SEQUENCE[family]}"]
    return argv + (["--lora_alpha=4"] if family == "flux" else [])  # the SD3 script sets alpha = rank (4)


# Runs `python -c MEASURE <kind> <argv...>` in a fresh process: the trainer in-process with every optimizer
# step stamped, then its peak memory.
# With FLOW_STEP_UNTIL_TRAINING set, the child reports and exits at the transformer's first forward (loading,
# caching and setup measured; the steps not run).
MEASURE = r"""
import json, os, resource, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
stamps = []
register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))

def report(partial):
    # VmHWM, not ru_maxrss: ru_maxrss carries the parent's high-water mark across fork + exec
    hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")]
    peak = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    print("MEASURED " + json.dumps({"stamps": stamps, "peak_bytes": peak, "partial": partial}), flush=True)

if os.environ.get("FLOW_STEP_UNTIL_TRAINING"):
    from torch.nn.modules.module import register_module_forward_pre_hook

    def stop(module, args):
        if type(module).__name__ in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
            report(True)
            os._exit(0)

    register_module_forward_pre_hook(stop)
kind, argv = sys.argv[1], sys.argv[2:]
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
report(False)
"""


def measure(python: str, kind: str, argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """s/step (median interval between optimizer steps after the first) and peak bytes of one run."""
    done = subprocess.run([python, "-c", MEASURE, kind, *argv], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURED ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("MEASURED ") :])
    stamps = result["stamps"]
    if result["partial"]:
        return {"step": float("nan"), "peak": result["peak_bytes"]}
    if len(stamps) < 2:
        raise SystemExit(f"{kind}: {len(stamps)} optimizer steps stamped; run at least 2 steps")
    return {"step": statistics.median(b - a for a, b in zip(stamps, stamps[1:])), "peak": result["peak_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "flow")
    parser.add_argument("--peer-dir", type=Path, default=None, help="diffusers' examples/dreambooth folder")
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--families", nargs="+", default=["flux", "sd3"])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="repeat the whole comparison (machine noise)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--no-lycoris", action="store_true", help="skip the LoKr / KronA rows")
    parser.add_argument("--no-nf4", action="store_true", help="skip the NF4 row")
    parser.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these")
    parser.add_argument("--nf4-precision", default="bf16", help="the NF4 row's compute precision (no = fp32)")
    parser.add_argument(
        "--until-training",
        nargs="*",
        default=[],
        help="precisions whose runs stop at the first training forward (peak of loading + caching only; for a CPU "
        "without bf16 instructions, where a bf16 step of the real-width model takes hours)",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = save_models(args.workdir, args.families)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.setdefault("OMP_NUM_THREADS", "1")

    # (family, row name, python, kind, precision, method, quantize)
    sides = []
    for family in args.families:
        for precision in args.precisions:
            sides.append((family, f"personalize lora {precision}", sys.executable, "ours", precision, "lora", ""))
            if args.peer_dir:
                sides.append((family, f"diffusers {precision}", args.peer_python, "peer", precision, "lora", ""))
        if not args.no_nf4:
            name = f"personalize lora nf4 {args.nf4_precision}"
            sides.append((family, name, sys.executable, "ours", args.nf4_precision, "lora", "nf4"))
        if not args.no_lycoris:
            for method in ("lokr", "krona"):  # fp32: the faster precision on a CPU without bf16 instructions
                sides.append((family, f"personalize {method} no", sys.executable, "ours", "no", method, ""))
    if args.only:
        sides = [side for side in sides if any(word in side[1] for word in args.only)]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {(s[0], s[1]): [] for s in sides}
    for repeat in range(args.repeats):
        for family, name, python, kind, precision, method, quantize in sides:
            out = args.workdir / "runs" / f"{family}-{name.replace(' ', '_')}"
            if kind == "ours":
                argv = ours_argv(family, models[family], out, args.steps, precision, args, method, quantize)
            else:
                argv = peer_argv(family, models[family], out, args.steps, precision, args)
            started = time.perf_counter()
            until = {"FLOW_STEP_UNTIL_TRAINING": "1"} if precision in args.until_training and not quantize else {}
            result = measure(python, kind, argv, {**env, **until})
            runs[(family, name)].append(result)
            seconds = time.perf_counter() - started
            figures = f"{result['step']:7.2f} s/step {result['peak'] / 2**20:7.0f} MB ({seconds:.0f} s)"
            print(f"repeat {repeat + 1} {family} {name:30s} {figures}", flush=True)
        report({key: results for key, results in runs.items() if results}, args)  # so far


def report(runs: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace) -> None:
    """Medians over the repeats, min-max as the noise; ratios of the medians."""
    done = min(len(results) for results in runs.values())
    print(f"\n{args.resolution} px, batch 1, rank 4, {args.steps} steps a run, {done} repeats (median, min-max)")
    print("| family | trainer | s/step | peak MB | vs diffusers (time, memory) | vs our LoRA fp32 (time) |")
    print("| --- | --- | --- | --- | --- | --- |")
    table = {}
    for key, results in runs.items():
        steps, peaks = [r["step"] for r in results], [r["peak"] / 2**20 for r in results]
        table[key] = (statistics.median(steps), statistics.median(peaks), steps, peaks)
    for (family, name), (step, peak, steps, peaks) in table.items():
        versus, lora = "", ""
        precision = name.split()[-1]
        peer = table.get((family, f"diffusers {precision}"))
        if name.startswith("personalize lora") and "nf4" not in name and peer:
            versus = (
                f"memory {peak / peer[1]:.2f}x" if math.isnan(step) else f"{step / peer[0]:.2f}x, {peak / peer[1]:.2f}x"
            )
        if "nf4" in name and (family, "diffusers bf16") in table:
            versus = f"memory {peak / table[(family, 'diffusers bf16')][1]:.2f}x of its bf16"
        ours = table.get((family, "personalize lora no"))
        if ("lokr" in name or "krona" in name) and ours:
            lora = f"{step / ours[0]:.2f}x"
        noise = "stopped at training" if math.isnan(step) else f"{step:.2f} ({min(steps):.2f}-{max(steps):.2f})"
        memory = f"{peak:.0f} ({min(peaks):.0f}-{max(peaks):.0f})"
        print(f"| {family} | {name} | {noise} | {memory} | {versus} | {lora} |", flush=True)


if __name__ == "__main__":
    main()
