"""`personalize merge A[:w] B[:w] ... --method M [--rank R] [--into-base --base MODEL] -o OUT`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from personalize.errors import UserError

# = personalize.adapters.merge_ops.METHODS, spelled out so that `personalize --help` does not import torch.
METHODS = ("linear", "cat", "svd", "ties", "dare", "dare-ties", "fusion")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge several adapters into one LoRA, or into the base model",
        description="Merge adapters of any layout the toolkit reads (ours, diffusers, kohya/A1111, LyCORIS "
        "LoRA/LoCon/LoHa/LoKr/KronA, peft) with per-input weights. Writes a LoRA in diffusers + kohya layout "
        "(peft for language models), or with --into-base a full model folder. Prints the relative error of "
        "every layer against the exact weighted sum of the inputs' deltas.",
    )
    parser.add_argument("inputs", nargs="+", metavar="ADAPTER[:WEIGHT]", help="adapter file or folder, weight 1.0")
    parser.add_argument("--method", default="svd", choices=METHODS, help="how to combine (default svd)")
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="rank of the result (svd, fusion; forces "
        "linear/ties/dare onto full deltas); default: the largest input rank",
    )
    parser.add_argument("--density", type=float, default=None, help="ties/dare: fraction of entries kept (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="dare: seed of the random drops (per layer)")
    parser.add_argument(
        "--base",
        default=None,
        help="base model (tiny name, folder, hub id): needed for "
        "LoHa/LoKr/KronA/DoRA/IA3 inputs, --into-base and fusion; checks the layer names",
    )
    parser.add_argument("--into-base", action="store_true", help="write the base model with the merge folded in")
    parser.add_argument(
        "--prompts",
        action="append",
        default=None,
        metavar="FILE",
        help="fusion: a file of prompts (one per line) per input, in input order; default: each run's own prompts",
    )
    parser.add_argument("--fusion-steps", type=int, default=10, help="fusion: denoising steps per prompt")
    parser.add_argument("--regularization", type=float, default=1e-3, help="fusion: ridge weight toward the base")
    parser.add_argument("--family", default=None, help="sd1, sd2, sdxl, sd3, flux, llm, vlm (default: guessed)")
    parser.add_argument("--allow-pickle", action="store_true", help="read .pt/.bin/.ckpt (weights_only=True)")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument("--all-layers", action="store_true", help="print every layer's error, not only the worst")
    parser.set_defaults(run=run)


def _prompts(files: list[str] | None, count: int) -> list[list[str]] | None:
    if files is None:
        return None
    if len(files) != count:
        raise UserError(f"--prompts was given {len(files)} times for {count} inputs; give one file per input")
    out = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise UserError(f"--prompts {file} does not exist")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise UserError(f"--prompts {file} holds no prompt")
        out.append(lines)
    return out


def run(args: argparse.Namespace) -> int:
    from personalize.merge import merge_adapters

    if args.density is not None and args.method not in ("ties", "dare", "dare-ties"):
        raise UserError(f"--density applies to ties, dare and dare-ties, not {args.method}")
    if args.prompts is not None and args.method != "fusion":
        raise UserError("--prompts applies to --method fusion only")
    if args.fusion_steps < 1:
        raise UserError(f"--fusion-steps must be at least 1 (got {args.fusion_steps})")
    result = merge_adapters(
        args.inputs,
        method=args.method,
        rank=args.rank,
        density=0.5 if args.density is None else args.density,
        seed=args.seed,
        base=args.base,
        into_base=args.into_base,
        output=args.output,
        prompts=_prompts(args.prompts, len(args.inputs)),
        regularization=args.regularization,
        fusion_steps=args.fusion_steps,
        family=args.family,
        allow_pickle=args.allow_pickle,
    )
    layers = sorted(((e, m) for m, e in result.errors.items() if m != "overall"), reverse=True)
    shown = layers if args.all_layers else layers[:5]
    for error, module in shown:
        print(f"{module}: relative error {error:.3e}")
    if len(shown) < len(layers):
        print(f"... {len(layers) - len(shown)} more layers (--all-layers, or see merge_report.json)")
    print(f"{result.layers} layers, overall relative error {result.errors['overall']:.3e} ({result.method})")
    for path in result.files:
        print(path)
    return 0
