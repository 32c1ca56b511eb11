"""`personalize train --task classify`: the flags that apply -> ClassifyConfig -> the recipe."""

from __future__ import annotations

import argparse
from typing import Any

FLAGS = ("images", "model", "method", "val_split", "steps", "lr", "batch_size", "seed", "output")


def run_classify(args: argparse.Namespace) -> int:
    from personalize.config import build
    from personalize.trainers.vision.classify import train_classifier
    from personalize.trainers.vision.config import ClassifyConfig

    flags: dict[str, Any] = {name: getattr(args, name, None) for name in FLAGS}
    config = build(ClassifyConfig, preset=args.preset, file=args.config, flags=flags, overrides=args.set)
    if not config.images:
        from personalize.errors import UserError

        raise UserError("--task classify needs --images DIR (one sub-folder of images per class)")
    train_classifier(config)
    return 0
