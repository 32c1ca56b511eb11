"""NOAH's three stages on the few-shot split (trainers/vision/noah.py has the supernet and the search):
the supernet on part of the training images, the search on the rest, the chosen subnet retrained on all.

`method_options.config` (a list of {lora, adapter, vpt} per block, e.g. from a previous run's card or
classifier metadata) skips the first two stages and trains that configuration.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from personalize.errors import UserError
from personalize.trainers.vision import noah
from personalize.trainers.vision.classify import accuracy, fit
from personalize.trainers.vision.config import ClassifyConfig
from personalize.trainers.vision.data import split
from personalize.trainers.vision.methods import Classifier, build_classifier, head_for


def train_noah(
    backbone: Any,
    classes: list[str],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    train_idx: torch.Tensor,
    config: ClassifyConfig,
    say: Any = print,
) -> tuple[Classifier, list[float], dict[str, Any]]:
    """(the chosen subnet's classifier, its training losses, what the search found for metrics and card)."""
    opts = noah.options(config.method_options)
    width = backbone.vision.config.hidden_size
    found: dict[str, Any] = {}
    chosen = opts.get("config")
    if chosen is None:
        # 1. supernet: the largest size of every module; each step one uniformly drawn configuration
        fit_pos, search_pos = split(labels[train_idx], opts["search_split"], config.seed)
        if not len(search_pos):
            raise UserError("noah: too few training images for a search split; add images or raise search_split")
        fit_idx, search_idx = train_idx[fit_pos], train_idx[search_pos]
        space = noah.space_of(opts)
        supernet = noah.Noah(backbone, max(space["lora"]), max(space["adapter"]), max(space["vpt"]))
        classifier = Classifier(backbone, "noah", head_for(backbone, classes, config.prompt), supernet)
        rng = random.Random(config.seed)
        blocks = len(supernet.blocks)
        say(f"noah: supernet on {len(fit_idx)} images, search on {len(search_idx)}")
        trainable = [p for p in classifier.parameters() if p.requires_grad]
        supernet_losses = fit(
            classifier,
            trainable,
            pixels,
            labels,
            fit_idx,
            config,
            before_step=lambda: supernet.set_config(noah.random_config(space, blocks, rng)),
        )
        # 2. search: configurations scored by accuracy on the search split, with the supernet's weights
        classifier.eval()

        def score(candidate: noah.Config) -> float:
            supernet.set_config(candidate)
            return accuracy(classifier, pixels[search_idx], labels[search_idx], config.batch_size)

        chosen, search_accuracy, scored = noah.search(supernet, score, opts, width, config.seed)
        supernet.remove()
        found = {
            "noah_search_accuracy": search_accuracy,
            "noah_configs_scored": scored,
            "noah_supernet_losses": supernet_losses,
        }
        say(f"noah: {scored} configurations scored; the best reaches {search_accuracy:.3f} on the search split")
    # 3. the chosen subnet, from scratch, on all training images
    options = {**config.method_options, "config": chosen}
    classifier = build_classifier(backbone, "noah", classes, config.prompt, options)
    classifier.saved_options = {"config": chosen}
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    losses = fit(classifier, trainable, pixels, labels, train_idx, config)
    found["noah_config"] = chosen
    found["noah_config_params"] = noah.config_params(chosen, width)
    return classifier, losses, found
