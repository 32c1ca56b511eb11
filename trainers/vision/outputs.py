"""What a classification run writes, and reading it back for `personalize predict`.

classifier.safetensors  the method's trained tensors (CoOp context, adapter MLP, Tip-Adapter cache,
                        VPT prompts, linear head, the core adapter's state under `vision.`); its
                        metadata holds the method, base model, classes, prompt and options
confusion.png           held-out confusion matrix (rows: true class, columns: predicted)
metrics.json, config.yaml, README.md (model card)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

from personalize.errors import UserError
from personalize.trainers.vision.config import ClassifyConfig

CLASSIFIER_FILE = "classifier.safetensors"


def save(out: Path, classifier: Any, classes: list[str], config: ClassifyConfig, metrics: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "method": config.method,
        "model": config.model,
        "classes": classes,
        "prompt": config.prompt,
        "method_options": {**config.method_options, **getattr(classifier, "saved_options", {})},
    }
    state = {k: v.contiguous() for k, v in classifier.trained_state().items()}
    if not state:  # zero-shot: nothing trained, the file still names the classes and the base
        state = {"no_weights": torch.zeros(0)}
    save_file(state, str(out / CLASSIFIER_FILE), metadata={"personalize": json.dumps(info)})
    confusion_png(torch.tensor(metrics["confusion"]), classes).save(out / "confusion.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.yaml").write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    (out / "README.md").write_text(model_card(out, config, classes, metrics))
    return [out / name for name in (CLASSIFIER_FILE, "confusion.png", "metrics.json", "config.yaml", "README.md")]


def load(folder: str | Path) -> tuple[Any, list[str]]:
    """The classifier of a run folder on its (reloaded) backbone, in eval mode; and the class names."""
    from personalize.trainers.vision.backbone import load_backbone
    from personalize.trainers.vision.methods import build_classifier

    file = Path(folder) / CLASSIFIER_FILE
    if not file.is_file():
        raise UserError(f"{folder} holds no {CLASSIFIER_FILE}; pass the output folder of a --task classify run")
    with safe_open(str(file), framework="pt") as handle:
        info = json.loads((handle.metadata() or {}).get("personalize", "{}"))
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    state.pop("no_weights", None)
    backbone = load_backbone(info["model"])
    cache = None
    if info["method"].startswith("tip-adapter"):
        cache = (state["head.keys"], state["head.values"].argmax(dim=-1))
    classifier = build_classifier(
        backbone, info["method"], info["classes"], info["prompt"], info.get("method_options") or {}, cache
    )
    classifier.load_trained_state(state)
    classifier.eval()
    return classifier, info["classes"]


def confusion_png(confusion: torch.Tensor, classes: list[str], cell: int = 48) -> Image.Image:
    """Rows true, columns predicted; each cell shaded by its share of the row and labelled with its count."""
    n = len(classes)
    margin = 12 + 7 * max(len(c) for c in classes)
    image = Image.new("RGB", (margin + n * cell + 8, margin + n * cell + 8), "white")
    draw = ImageDraw.Draw(image)
    rows = confusion.sum(dim=1, keepdim=True).clamp(min=1)
    for i, name in enumerate(classes):
        draw.text((4, margin + i * cell + cell // 2 - 5), name, fill="black")
        draw.text((margin + i * cell + 4, margin - 14), name[: cell // 7], fill="black")
        for j in range(n):
            share = float(confusion[i, j] / rows[i])
            shade = int(255 * (1 - share))
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + cell // 2 - 6, box[1] + cell // 2 - 5), str(int(confusion[i, j])), fill="black")
    return image


def model_card(out: Path, config: ClassifyConfig, classes: list[str], metrics: dict) -> str:
    accuracy = metrics.get("val_accuracy")
    held = (
        f"{accuracy:.3f} on {metrics['val_images']} held-out images (chance {metrics['chance']:.3f})"
        if accuracy is not None
        else "not measured (--val-split 0)"
    )
    return "\n".join(
        [
            f"# {out.name}: a few-shot image classifier",
            "",
            f"- base model: `{config.model}`",
            f"- method: `{config.method}` ({metrics['trainable_params']:,} trained parameters, {config.steps} steps, "
            f"lr {config.lr})",
            f"- classes ({len(classes)}): {', '.join(classes)}",
            f"- held-out accuracy: {held}",
            f"- trained on the images in `{config.images}` (one folder per class), seed {config.seed}",
            *noah_lines(metrics),
            "",
            "![confusion matrix](confusion.png)",
            "",
            "```bash",
            f"personalize predict {out} photo.jpg",
            "```",
            "",
            "```python",
            "from personalize.trainers.vision.outputs import load",
            f'classifier, classes = load("{out}")',
            "```",
            "",
        ]
    )


def noah_lines(metrics: dict) -> list[str]:
    """The configuration NOAH's search chose, one table row per block (empty for other methods)."""
    chosen = metrics.get("noah_config")
    if not chosen:
        return []
    found = (
        f"search accuracy {metrics['noah_search_accuracy']:.3f} over {metrics['noah_configs_scored']} configurations"
        if "noah_search_accuracy" in metrics
        else "given in method_options.config"
    )
    lines = ["", f"NOAH configuration ({found}; {metrics['noah_config_params']:,} parameters):", ""]
    lines += ["| block | LoRA rank (q, v) | adapter dim | VPT tokens |", "| --- | --- | --- | --- |"]
    lines += [f"| {i} | {c['lora']} | {c['adapter']} | {c['vpt']} |" for i, c in enumerate(chosen)]
    return lines
