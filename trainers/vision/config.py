"""ClassifyConfig: every key of `personalize train --task classify --images pets/ --model tiny-clip`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from personalize.config import option

CLIP_METHODS = ("zero-shot", "coop", "clip-adapter", "tip-adapter", "tip-adapter-f")
PROMPT_METHODS = ("vpt-shallow", "vpt-deep")
HEAD_METHODS = ("linear",)  # a linear head on the frozen encoder (the ViT's linear probe)
# methods of the injection core that adapt the image encoder's own layers
CORE_METHODS = ("lora", "dora", "loha", "lokr", "ia3", "oft", "boft", "vera", "bitfit", "norm", "difffit")
CORE_METHODS += ("houlsby", "pfeiffer")  # bottleneck adapters (personalize/adapters/bottleneck.py)
SEARCH_METHODS = ("noah",)  # per-block choice among adapter / LoRA / VPT (trainers/vision/noah.py)
METHODS = CLIP_METHODS + PROMPT_METHODS + HEAD_METHODS + CORE_METHODS + SEARCH_METHODS
# method -> (lr, steps). CoOp: SGD lr 2e-3 in the paper, here AdamW; CLIP-Adapter and Tip-Adapter-F:
# AdamW 1e-3 as their papers; VPT and the adapters of the core: their usual few-shot rates.
METHOD_DEFAULTS: dict[str, tuple[float, int]] = {
    "zero-shot": (0.0, 0),
    "tip-adapter": (0.0, 0),
    "coop": (2e-3, 200),
    "clip-adapter": (1e-3, 200),
    "tip-adapter-f": (1e-3, 200),
    "vpt-shallow": (1e-2, 200),
    "vpt-deep": (1e-2, 200),
    "linear": (1e-2, 200),
    "noah": (1e-2, 200),  # supernet and retraining each; NOAH's VTAB runs: AdamW 1e-3 over 500 epochs
}


@dataclass
class ClassifyConfig:
    images: str = option("", "folder with one sub-folder of images per class (the folder name is the class)")
    model: str = option("tiny-clip", "tiny-clip, tiny-vit, a CLIP/ViT hub id or a local folder")
    method: str = option("coop", f"one of {', '.join(METHODS)}")
    val_split: float = option(0.2, "share of each class's images held out for the accuracy (0: none)")
    steps: int | None = option(None, "optimizer steps; None: the method's default (0 for training-free ones)")
    lr: float | None = option(None, "learning rate; None: the method's default")
    batch_size: int = option(16, "images per step")
    seed: int = option(0, "seed of the split, the initialization and the batches")
    prompt: str = option("a photo of a {}.", "CLIP prompt template (zero-shot, CLIP-Adapter, Tip-Adapter, core)")
    method_options: dict[str, Any] = option({}, "extra hyperparameters, e.g. {n_ctx: 4} (CoOp), {rank: 4} (LoRA)")
    output: str = option("", "output folder; '' = ./personalize-out/<images folder name>-classifier")
