"""`personalize predict OUT image.jpg ...`: class probabilities from a `--task classify` run's output."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify images with a few-shot classifier (the output folder of `train --task classify`)",
        description="Print each image's class probabilities, most likely first.",
    )
    parser.add_argument("classifier", metavar="OUT", help="output folder of a `personalize train --task classify` run")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print per image (default 5)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from personalize.data.decode import BadImage
    from personalize.errors import UserError
    from personalize.trainers.vision.data import read_image
    from personalize.trainers.vision.outputs import load

    classifier, classes = load(args.classifier)
    backbone = classifier.backbone[0]
    failed = 0
    for name in args.images:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"{name} is not a file")
        try:
            pixels = read_image(path, backbone.image_size, backbone.mean, backbone.std)[None]
        except BadImage as reason:
            print(f"{name}: skipped ({reason})")
            failed += 1
            continue
        with torch.no_grad():
            probabilities = classifier(pixels=pixels).softmax(dim=-1)[0]
        ranked = probabilities.argsort(descending=True)[: max(1, args.top)]
        print(f"{name}: " + ", ".join(f"{classes[i]} {float(probabilities[i]):.3f}" for i in ranked.tolist()))
    if failed == len(args.images):
        raise UserError("none of the images could be read")
    return 0
