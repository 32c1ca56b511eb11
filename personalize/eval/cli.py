"""`personalize eval OUT`: subject fidelity, prompt fidelity and language drift of a trained run."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a trained run: DINO and CLIP-I (subject), CLIP-T (prompt), class drift",
        description="Generate with fixed seeds for a prompt set (with and without the adapter) and score the "
        "images: DINO and CLIP-I similarity to the training photos, CLIP-T similarity to the prompt, and the "
        "similarity of class-prompt images with and without the adapter (language drift). Writes "
        "OUT/eval/eval.json, eval.md and contact_sheet.png.",
    )
    parser.add_argument("output", metavar="OUT", help="the output folder of a `personalize train` run")
    parser.add_argument(
        "--prompts", default="dreambench", help="dreambench (default) or a text file, one prompt a line"
    )
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--class-prompts", type=int, default=4, metavar="N", help="class prompts for drift (default 4)")
    parser.add_argument(
        "--metric-model",
        action="append",
        default=[],
        metavar="KIND=ID",
        help="dino=ID or clip=ID: a hub id or folder (defaults: facebook/dino-vits16, openai/clip-vit-base-patch32)",
    )
    parser.add_argument("--model", default="", help="base model (default: the run's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from personalize.eval.embedders import parse_metric_models
    from personalize.eval.run import EvalSettings, evaluate

    settings = EvalSettings(
        prompts=args.prompts,
        seeds=args.seeds,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        class_prompts=args.class_prompts,
        metric_models=parse_metric_models(args.metric_model),
        model=args.model,
        device=args.device,
    )
    evaluate(args.output, settings)
    return 0
