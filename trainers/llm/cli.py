"""Routing `personalize train` to the LLM/VLM recipe: by the model's family, or a JSONL --data file."""

from __future__ import annotations

import argparse
from typing import Any

from personalize.config import merge, parse_overrides, read_preset, read_yaml_file
from personalize.pipelines.text import language_family


def _raw_config(args: argparse.Namespace, flags: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.preset:
        data = merge(data, read_preset(args.preset))
    if args.config:
        data = merge(data, read_yaml_file(args.config))
    return merge(merge(data, flags), parse_overrides(args.set))


def is_language_run(args: argparse.Namespace) -> bool:
    raw = _raw_config(args, {"model": args.model} if args.model else {})
    if isinstance(raw.get("data"), str):  # diffusion runs take a mapping (images, prompts, ...) here
        return True
    return language_family(str(raw.get("model", ""))) is not None


def run_language(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    from personalize.config import build
    from personalize.trainers.llm.config import LLMTrainConfig
    from personalize.trainers.llm.sft import train

    train(build(LLMTrainConfig, preset=args.preset, file=args.config, flags=flags, overrides=args.set))
    return 0
