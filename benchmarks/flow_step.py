"""Seconds per step and peak memory on SD3 / Flux: `personalize train` against diffusers' DreamBooth-LoRA scripts.

Same pipelines (reduced-depth, real-width random-init builds from personalize.models.tiny_flow: FLUX.1-dev's
width with 1 double + 1 single block, SD3.5-medium's width with 2 blocks), saved locally; same settings:
256 px center crops, batch 1, LoRA rank 4 (alpha 4) on each family's reference targets (Flux: attention +
feed-forward, SD3: attention), cached latents on both sides, no validation, no checkpoints; fp32 and bf16.
Also ours with `--quantize nf4` (bf16) against the reference's bf16 peak, and LoKr / KronA against our LoRA
at the same targets. Each run goes twice, W and W + N steps, in fresh processes; s/step = (T(W+N) - T(W)) / N.
Peak memory: the child's max RSS (CPU) or torch.cuda.max_memory_allocated (GPU), the larger of its two runs.

    python -m benchmarks.flow_step --peer-dir DIFFUSERS/examples/dreambooth --peer-python VENV/bin/python
        [--families flux sd3] [--precisions no bf16] [--steps 3] [--warmup 1] [--repeats 2]

The reference scripts import torchvision: run them from their own venv (--peer-python).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import train_step
from benchmarks.train_step import IMAGES, ROOT, measure

SCRIPTS = {"flux": "train_dreambooth_lora_flux.py", "sd3": "train_dreambooth_lora_sd3.py"}
TARGETS = {"flux": "attention+ff", "sd3": "attention"}  # the reference scripts' default target lists


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
    return [f"--mixed_precision={precision}" if a == "--mixed_precision=no" else a for a in shared] + [
        "--lora_alpha=4",
        "--cache_latents",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "flow")
    parser.add_argument("--peer-dir", type=Path, default=None, help="diffusers' examples/dreambooth folder")
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--families", nargs="+", default=["flux", "sd3"])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="repeat the whole comparison (machine noise)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--no-lycoris", action="store_true", help="skip the LoKr / KronA rows")
    parser.add_argument("--no-nf4", action="store_true", help="skip the NF4 row")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = save_models(args.workdir, args.families)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    # (family, row name, python, kind, precision, method, quantize)
    sides = []
    for family in args.families:
        for precision in args.precisions:
            sides.append((family, f"personalize lora {precision}", sys.executable, "ours", precision, "lora", ""))
            if args.peer_dir:
                sides.append((family, f"diffusers {precision}", args.peer_python, "peer", precision, "lora", ""))
        if not args.no_nf4:
            sides.append((family, "personalize lora nf4 (bf16)", sys.executable, "ours", "bf16", "lora", "nf4"))
        if not args.no_lycoris:
            for method in ("lokr", "krona"):
                sides.append((family, f"personalize {method} bf16", sys.executable, "ours", "bf16", method, ""))
    for repeat in range(args.repeats):
        results: dict[tuple[str, str], list[dict[str, float]]] = {(s[0], s[1]): [] for s in sides}
        for steps in (args.warmup, args.warmup + args.steps):
            for family, name, python, kind, precision, method, quantize in sides:
                out = args.workdir / "runs" / f"{family}-{name.replace(' ', '_')}-{steps}"
                if kind == "ours":
                    argv = ours_argv(family, models[family], out, steps, precision, args, method, quantize)
                else:
                    argv = peer_argv(family, models[family], out, steps, precision, args)
                started = time.perf_counter()
                results[(family, name)].append(measure(python, kind, argv, env))
                print(f"{family} {name:34s} {steps:3d} steps: {time.perf_counter() - started:7.1f} s", flush=True)
        report(results, args, repeat)


def report(results: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace, repeat: int) -> None:
    print(f"\nrepeat {repeat + 1}: {args.resolution} px, batch 1, rank 4, {args.steps} steps after {args.warmup}")
    print(f"{'family':6s} {'trainer':34s} {'s/step':>8s} {'peak MB':>9s} {'vs peer':>18s} {'vs our LoRA':>12s}")
    table = {}
    for key, runs in results.items():
        step = (runs[1]["seconds"] - runs[0]["seconds"]) / args.steps
        table[key] = (step, max(run["peak_bytes"] for run in runs) / 2**20)
    for (family, name), (step, peak) in table.items():
        versus, lora = "", ""
        precision = name.split()[-1]
        peer = table.get((family, f"diffusers {precision}"))
        if name.startswith("personalize lora") and peer and precision in ("no", "bf16"):
            versus = f"{step / peer[0]:.2f}x t {peak / peer[1]:.2f}x m"
        if "nf4" in name and (family, "diffusers bf16") in table:
            versus = f"{peak / table[(family, 'diffusers bf16')][1]:.2f}x bf16 m"
        ours = table.get((family, "personalize lora bf16"))
        if ("lokr" in name or "krona" in name) and ours:
            lora = f"{step / ours[0]:.2f}x t"
        print(f"{family:6s} {name:34s} {step:8.2f} {peak:9.0f} {versus:>18s} {lora:>12s}", flush=True)


if __name__ == "__main__":
    main()
