"""The few-shot classification recipe: class folders -> split -> backbone -> method -> train -> held-out
accuracy, confusion matrix, model card, and a classifier `personalize predict` reloads.

    from personalize.trainers.vision.classify import train_classifier
    result = train_classifier(ClassifyConfig(images="pets/", model="tiny-clip", method="coop"))
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from personalize import adapters
from personalize.errors import UserError
from personalize.trainers.vision import outputs
from personalize.trainers.vision.backbone import load_backbone
from personalize.trainers.vision.config import CORE_METHODS, METHOD_DEFAULTS, METHODS, ClassifyConfig
from personalize.trainers.vision.data import read_classes, split
from personalize.trainers.vision.methods import ADAPTER_NAME, build_classifier


@dataclass
class ClassifyResult:
    output_dir: Path
    classes: list[str]
    metrics: dict[str, Any]


def _check(config: ClassifyConfig) -> ClassifyConfig:
    if config.method not in METHODS:
        from personalize.config import nearest

        raise UserError(
            f"unknown --method '{config.method}'{nearest(config.method, METHODS)} for --task classify; "
            f"methods: {', '.join(METHODS)}"
        )
    lr, steps = METHOD_DEFAULTS.get(config.method, (1e-3, 200))
    config.lr = lr if config.lr is None else config.lr
    config.steps = steps if config.steps is None else config.steps
    if config.method in ("zero-shot", "tip-adapter") and config.steps:
        raise UserError(f"--method {config.method} is training-free; leave out --steps")
    config.output = config.output or str(Path("personalize-out") / f"{Path(config.images).name}-classifier")
    return config


@torch.no_grad()
def _features(classifier: Any, pixels: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([classifier.features(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def _logits(classifier: Any, pixels: torch.Tensor, features: torch.Tensor | None, batch: int) -> torch.Tensor:
    with torch.no_grad():
        if features is not None:
            return classifier(features=features)
        return torch.cat([classifier(pixels=pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def train_classifier(config: ClassifyConfig, say: Any = print) -> ClassifyResult:
    config = _check(config)
    torch.manual_seed(config.seed)
    # 1. data: class folders, a per-class held-out split
    backbone = load_backbone(config.model)
    classes, images = read_classes(config.images, backbone.image_size, backbone.mean, backbone.std)
    if images.skipped:
        say(f"skipped {len(images.skipped)} files: " + ", ".join(f"{p.name} ({r})" for p, r in images.skipped[:5]))
    train_idx, val_idx = split(images.labels, config.val_split, config.seed)
    say(
        f"{len(classes)} classes, {len(train_idx)} training and {len(val_idx)} held-out images; "
        f"{config.method} on {config.model}"
    )
    # 2. the classifier (frozen encoders; Tip-Adapter's cache = the training features)
    pixels, labels = images.pixels, images.labels
    start = time.perf_counter()
    search: dict[str, Any] = {}
    if config.method == "noah":  # supernet, search, then the chosen subnet trains from scratch
        from personalize.trainers.vision.noah_train import train_noah

        classifier, losses, search = train_noah(backbone, classes, pixels, labels, train_idx, config, say)
        trainable = [p for p in classifier.parameters() if p.requires_grad]
        features = None
    else:
        cache = None
        if config.method.startswith("tip-adapter"):
            with torch.no_grad():
                cache = (backbone.image_features(pixels[train_idx]), labels[train_idx])
        classifier = build_classifier(backbone, config.method, classes, config.prompt, config.method_options, cache)
        features = _features(classifier, pixels, config.batch_size) if classifier.uses_features else None
        # 3. train (the trained parameters only; features cached when the image encoder is untouched)
        trainable = [p for p in classifier.parameters() if p.requires_grad]
        if config.method in CORE_METHODS:  # the adapter lives in the image encoder's layers
            trainable += adapters.trainable_parameters(backbone.vision, ADAPTER_NAME)
        losses = fit(classifier, trainable, pixels, labels, train_idx, config, features)
    seconds = time.perf_counter() - start
    # 4. evaluate on the held-out images
    metrics: dict[str, Any] = {"method": config.method, "model": config.model, "steps": config.steps, "losses": losses}
    metrics["seconds"] = round(seconds, 2)
    metrics["trainable_params"] = sum(p.numel() for p in trainable)
    metrics["classes"] = classes
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    if len(val_idx):
        logits = _logits(
            classifier, pixels[val_idx], None if features is None else features[val_idx], config.batch_size
        )
        predicted = logits.argmax(dim=-1)
        for truth, guess in zip(labels[val_idx].tolist(), predicted.tolist(), strict=True):
            confusion[truth, guess] += 1
        metrics["val_accuracy"] = float((predicted == labels[val_idx]).float().mean())
        metrics["val_images"] = len(val_idx)
    metrics["chance"] = 1.0 / len(classes)
    metrics.update(search)
    metrics["confusion"] = confusion.tolist()
    # 5. outputs: classifier, confusion matrix, card, config, metrics
    out = Path(config.output)
    files = outputs.save(out, classifier, classes, config, metrics)
    say(
        f"held-out accuracy {metrics['val_accuracy']:.3f} (chance {metrics['chance']:.3f}) on {len(val_idx)} images"
        if len(val_idx)
        else "no held-out images (--val-split 0)"
    )
    say(f"wrote {', '.join(sorted(p.name for p in files))} to {out}")
    return ClassifyResult(out, classes, metrics)


def fit(
    classifier: Any,
    trainable: list[torch.nn.Parameter],
    pixels: torch.Tensor,
    labels: torch.Tensor,
    train_idx: torch.Tensor,
    config: ClassifyConfig,
    features: torch.Tensor | None = None,
    before_step: Any = None,
) -> list[float]:
    """config.steps AdamW steps of cross-entropy on random batches of `train_idx`; the losses.
    `before_step()` runs before each step (NOAH's supernet samples its configuration there)."""
    losses: list[float] = []
    if not config.steps or not trainable:
        return losses
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(config.steps):
        batch = train_idx[torch.randint(len(train_idx), (min(config.batch_size, len(train_idx)),), generator=generator)]
        if before_step is not None:
            before_step()
        logits = classifier(features=features[batch]) if features is not None else classifier(pixels=pixels[batch])
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def accuracy(classifier: Any, pixels: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Share of `pixels` classified as `labels` (no gradients)."""
    return float((_logits(classifier, pixels, None, batch).argmax(dim=-1) == labels).float().mean())


def config_dict(config: ClassifyConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))
