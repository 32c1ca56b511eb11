"""Issue 27: `personalize train` against diffusers' DreamBooth-LoRA scripts per family, and lines of code per family.

Families: Flux.2 Klein (`train_dreambooth_lora_flux2_klein.py`), Qwen-Image (`_qwen_image.py`), Z-Image
(`_z_image.py`); `--families flux` runs the same harness on Flux.1 (`_flux.py`) as a stand-in.
Same pipelines on both sides: the family's published transformer config at reduced depth and real width
(`--heads`: the published head count by default; heads of 128), random weights, saved locally. Same settings:
256 px center crops, batch 1, LoRA rank 4 alpha 4 on the reference script's default targets (given to us as
the equivalent regex), cached latents, no validation, no checkpoints, bf16. Also ours with `--quantize nf4`
against the reference's bf16 peak. Each run goes twice, W and W + N steps, in fresh processes;
s/step = (T(W+N) - T(W)) / N; peak = the child's max RSS, the larger of its two runs. `--repeats` repeats
the whole side-by-side comparison (machine noise). Lines of code: non-blank, non-comment lines of our
family description file against the reference script.

    python -m benchmarks.families --peer-dir DIFFUSERS/examples/dreambooth --peer-python VENV/bin/python
        [--families flux2-klein qwen-image z-image] [--steps 2] [--warmup 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import flow_step, train_step
from benchmarks.train_step import IMAGES, ROOT, measure

ATTENTION = r"(.*\.)?(to_q|to_k|to_v|to_out\.0)"  # peft's suffix match of the scripts' default list
# family -> (reference script, our family file, builder "module:function", keyword for heads, our targets)
FAMILIES: dict[str, tuple[str, str, str, str, str]] = {
    "flux2-klein": (
        "train_dreambooth_lora_flux2_klein.py",
        "flux2_klein.py",
        "personalize.models.tiny_flow2:reduced_pipeline",
        "heads",
        ATTENTION[:-1] + r"|to_qkv_mlp_proj)|single_transformer_blocks\.\d+\.attn\.to_out",
    ),
    "qwen-image": (
        "train_dreambooth_lora_qwen_image.py",
        "qwen_image.py",
        "personalize.models.tiny_flow_more:reduced_qwen_image",
        "heads",
        ATTENTION,
    ),
    "z-image": (
        "train_dreambooth_lora_z_image.py",
        "z_image.py",
        "personalize.models.tiny_flow_more:reduced_z_image",
        "heads",
        ATTENTION,
    ),
    "flux": (
        "train_dreambooth_lora_flux.py",
        "flux.py",
        "personalize.models.tiny_flow:reduced_flux",
        "num_attention_heads",
        flow_step.TARGETS["flux"],
    ),
}
PUBLISHED_HEADS = {"flux2-klein": 24, "qwen-image": 24, "z-image": 30, "flux": 24}


def build(family: str, heads: int) -> Any:
    module, function = FAMILIES[family][2].split(":")
    builder = getattr(importlib.import_module(module), function)
    if family == "flux2-klein":
        return builder("tiny-flux2-klein", heads=heads)
    return builder(**{FAMILIES[family][3]: heads})


def save_models(workdir: Path, families: list[str], heads: dict[str, int]) -> dict[str, Path]:
    folders = {}
    for family in families:
        folder = workdir / f"{family}-{heads[family]}heads"
        if not (folder / "model_index.json").is_file():
            build(family, heads[family]).save_pretrained(folder)
        folders[family] = folder
    return folders


def lines_of_code(path: Path) -> int:
    """Non-blank lines that are not comments (docstrings count: they are part of the file)."""
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#"))


def ours_argv(family: str, model: Path, out: Path, steps: int, args: argparse.Namespace, quantize: str) -> list[str]:
    argv = ["train", "--model", str(model), "--images", str(IMAGES), "--method", "lora", "--rank", "4"]
    argv += ["--alpha", "4", "--targets", FAMILIES[family][4], "--resolution", str(args.resolution)]
    argv += ["--batch-size", "1", "--steps", str(steps), "--lr", "1e-4", "--mixed-precision", args.precision]
    argv += ["--checkpoint-every", "0", "--output", str(out), "--seed", "0", "--overwrite"]
    argv += ["--set", "validation_images=0", "--set", "data.bucketing=false", "--set", "data.num_workers=0"]
    # a fresh latent/text cache per run: both runs of a pair (and the reference) encode once
    argv += ["--set", f"data.cache_dir={args.workdir / 'cache' / out.name}", "--token", "sks", "--class-word", "cat"]
    return argv + (["--quantize", quantize] if quantize else [])


def peer_argv(family: str, model: Path, out: Path, steps: int, args: argparse.Namespace) -> list[str]:
    """The SD1.5 benchmark's reference arguments with the family's script, --precision, alpha 4, cached latents."""
    script = argparse.Namespace(peer_script=args.peer_dir / FAMILIES[family][0], resolution=args.resolution)
    shared = train_step.peer_argv(model, out, steps, script)
    argv = [f"--mixed_precision={args.precision}" if a == "--mixed_precision=no" else a for a in shared]
    if family == "flux2-klein":  # the script reads layers 10/20/30 by default, its pipeline (and we) 9/18/27
        argv += ["--text_encoder_out_layers", "9", "18", "27"]
    return [*argv, "--lora_alpha=4", "--cache_latents"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "families")
    parser.add_argument("--peer-dir", type=Path, required=True, help="diffusers' examples/dreambooth folder")
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--families", nargs="+", default=["flux2-klein", "qwen-image", "z-image"])
    parser.add_argument("--heads", type=int, default=0, help="attention heads of 128 (0: the published count)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument(
        "--precision", default="bf16", help="bf16 (the goal's) or no: fp32, for a CPU without bf16 instructions"
    )
    parser.add_argument("--no-nf4", action="store_true", help="skip the NF4 row")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    families_dir = ROOT / "personalize" / "models" / "families"
    for family in args.families:
        ours, theirs = families_dir / FAMILIES[family][1], args.peer_dir / FAMILIES[family][0]
        print(f"lines of code {family}: ours {lines_of_code(ours)} ({ours.name}), reference {lines_of_code(theirs)}")
    heads = {family: args.heads or PUBLISHED_HEADS[family] for family in args.families}
    models = save_models(args.workdir, args.families, heads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    sides = []  # (family, row name, python, kind, quantize)
    for family in args.families:
        sides.append((family, f"personalize lora {args.precision}", sys.executable, "ours", ""))
        sides.append((family, f"diffusers {args.precision}", args.peer_python, "peer", ""))
        if not args.no_nf4:
            sides.append((family, f"personalize lora nf4 ({args.precision})", sys.executable, "ours", "nf4"))
    for repeat in range(args.repeats):
        results: dict[tuple[str, str], list[dict[str, float]]] = {(s[0], s[1]): [] for s in sides}
        for steps in (args.warmup, args.warmup + args.steps):
            for family, name, python, kind, quantize in sides:
                out = args.workdir / "runs" / f"{family}-{name.replace(' ', '_')}-{steps}"
                shutil.rmtree(args.workdir / "cache" / out.name, ignore_errors=True)
                if kind == "ours":
                    argv = ours_argv(family, models[family], out, steps, args, quantize)
                else:
                    argv = peer_argv(family, models[family], out, steps, args)
                started = time.perf_counter()
                results[(family, name)].append(measure(python, kind, argv, env))
                print(f"{family} {name:30s} {steps:3d} steps: {time.perf_counter() - started:7.1f} s", flush=True)
        report(results, args, repeat, heads)


def report(results: dict[tuple[str, str], list[dict[str, float]]], args: argparse.Namespace, repeat: int,
           heads: dict[str, int]) -> None:  # fmt: skip
    print(f"\nrepeat {repeat + 1}: {args.resolution} px, batch 1, rank 4, {args.steps} steps after {args.warmup}")
    print(f"{'family':12s} {'trainer':30s} {'s/step':>8s} {'peak MB':>9s} {'vs diffusers':>22s}")
    table = {}
    for key, runs in results.items():
        step = (runs[1]["seconds"] - runs[0]["seconds"]) / args.steps
        table[key] = (step, max(run["peak_bytes"] for run in runs) / 2**20)
    for (family, name), (step, peak) in table.items():
        peer = table.get((family, f"diffusers {args.precision}"))
        versus = ""
        if peer and name == f"personalize lora {args.precision}":
            versus = f"{step / peer[0]:.2f}x t {peak / peer[1]:.2f}x m"
        elif peer and "nf4" in name:
            versus = f"{peak / peer[1]:.2f}x m"
        print(f"{family:12s} {name:30s} {step:8.2f} {peak:9.0f} {versus:>22s}  ({heads[family]} heads)", flush=True)


if __name__ == "__main__":
    main()
