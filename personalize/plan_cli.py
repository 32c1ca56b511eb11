"""`personalize plan`: the planner (personalize/plan.py) on the command line; loads no weights."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="estimate the peak GPU memory of training a flow-matching DiT model, and what fits a stated --vram",
        description="Estimate, before anything is loaded, the peak memory of `personalize train` on a flow-matching "
        "DiT model (SD3, Flux, Flux.2, Qwen-Image, Z-Image, HiDream, Krea 2, Wan, ...), split into its parts; with "
        "--vram, the cheapest settings that fit.",
    )
    add = parser.add_argument
    add("--model", required=True, help="hub id (e.g. Qwen/Qwen-Image), a local diffusers folder, or a tiny model")
    add("--method", default="lora", help="lora, dora, loha, lokr, krona, ia3 or full (default lora)")
    add("--rank", type=int, default=4)
    add("--targets", default="", help="adapter targets (default: the family's)")
    add("--resolution", type=int, default=512)
    add("--batch-size", type=int, default=1)
    add("--quantize", default="", choices=["", "nf4", "fp4", "int8"])
    add("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    add("--gradient-checkpointing", action="store_true")
    add("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "prodigy"])
    add("--frames", type=int, default=0, help="video models: frames per clip (default: the family's, 17 for Wan)")
    add("--task", choices=["edit"], help="edit: an edit model trained on (source, target) pairs (--task edit)")
    add("--vram", metavar="SIZE", help="fit this memory, e.g. 16GB: print the cheapest settings that fit")
    add("--device", default="cuda", choices=["cuda", "cpu"], help="cpu adds the Python/torch runtime (RSS)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from personalize.plan import Settings, fit, parse_size, plan

    settings = Settings(
        method=args.method,
        rank=args.rank,
        targets=args.targets,
        resolution=args.resolution,
        batch_size=args.batch_size,
        quantize=args.quantize,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
        frames=args.frames or _family_frames(args.model),
        edit=args.task == "edit",
    )
    if args.vram:
        estimate, applied = fit(args.model, settings, parse_size(args.vram), args.device)
        print(f"fits {args.vram}: " + (", ".join(applied) if applied else "as given"))
        flags = _flags(estimate.settings)
        print(f"  personalize train --model {args.model} {flags}".rstrip())
    else:
        estimate = plan(args.model, settings, args.device)
    chosen = estimate.settings
    print(f"{args.model} ({estimate.family}), {chosen.method}, {chosen.resolution} px, batch {chosen.batch_size}:")
    for line in estimate.lines():
        print(f"  {line}")
    return 0


def _family_frames(model: str) -> int:
    """A video family's default clip length (1 for image families)."""
    from personalize.plan import model_config

    family, _ = model_config(model)
    return family.clip[0] if family.clip else 1


def _flags(settings: Any) -> str:
    flags = [f"--method {settings.method}", f"--resolution {settings.resolution}"]
    flags.append(f"--mixed-precision {settings.mixed_precision}")
    if settings.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    if settings.optimizer != "adamw":
        flags.append(f"--optimizer {settings.optimizer}")
    if settings.quantize:
        flags.append(f"--quantize {settings.quantize}")
    return " ".join(flags)
