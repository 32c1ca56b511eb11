"""The `conditioning:` section of TrainConfig, read by the controlnet, t2i-adapter and ip-adapter recipes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from personalize.config import option

CONDITIONING_METHODS = ("controlnet", "t2i-adapter", "ip-adapter", "controlnext")

# method -> (rank, lr, steps, targets), as METHOD_DEFAULTS. Sources: ControlNet (Zhang et al. 2023, lr 1e-5),
# T2I-Adapter (Mou et al. 2023, lr 1e-5), IP-Adapter (Ye et al. 2023, lr 1e-4); steps suit a small dataset.
CONDITIONING_DEFAULTS: dict[str, tuple[int | None, float, int, str]] = {
    "controlnet": (None, 1e-5, 1000, ""),
    "t2i-adapter": (None, 1e-5, 1000, ""),
    "ip-adapter": (None, 1e-4, 1000, ""),
    "controlnext": (None, 1e-5, 1000, ""),  # ControlNeXt (Peng et al. 2024): the UNet subset; the module 10x
}


@dataclass
class ConditioningConfig:
    folder: str = option("", "conditioning images matched to the training images by file name; '' = annotator")
    annotator: Literal["canny", "tile"] = option("canny", "computes the conditioning when no folder is given")
    reference: str = option("", "ip-adapter: reference images matched by name; '' = each target image itself")
    prompt_dropout: float = option(
        0.05, "probability of training a sample with the empty prompt (ControlNet uses 0.5 to learn prompt-free)"
    )
    image_dropout: float = option(0.05, "ip-adapter: probability of a zero image embedding (IP-Adapter paper 0.05)")
    controlnet_adapter: str = option(
        "", "controlnet: train this core adapter method (e.g. lora) on the ControlNet instead of all its weights"
    )
    t2i_variant: Literal["full", "light"] = option("full", "t2i-adapter: full (77M on SD1.5) or light (5M); SDXL: full")
    image_encoder: str = option(
        "", "ip-adapter: CLIPVisionModelWithProjection (hub id or folder); '' = the one the family uses"
    )
    controlnext_scale: float = option(
        0.35, "controlnext: strength s of the cross-normalized control (the authors' SD1.5 runs: 0.35; dense: 1)"
    )
    controlnext_unet: str = option(
        r".*\.to_out\.0\.(weight|bias)",
        "controlnext: regex of the UNet parameters that train with the module (the authors: attention to_out)",
    )
