"""Names of the offline tiny models, reachable through the same `--model` argument everywhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from personalize.models import tiny_diffusion, tiny_flow2, tiny_flow_more, tiny_text, tiny_video

TINY_DIFFUSION: dict[str, Callable[[], Any]] = {
    "tiny-sd15": tiny_diffusion.tiny_sd15,
    "tiny-sd2": tiny_diffusion.tiny_sd2,
    "tiny-sdxl": tiny_diffusion.tiny_sdxl,
    "tiny-sd3": tiny_diffusion.tiny_sd3,
    "tiny-flux": tiny_diffusion.tiny_flux,
    "tiny-qwen-image": tiny_flow_more.tiny_qwen_image,
    "tiny-qwen-image-edit": tiny_flow_more.tiny_qwen_image_edit,
    "tiny-qwen-image-edit-plus": tiny_flow_more.tiny_qwen_image_edit_plus,
    "tiny-qwen-image21": tiny_flow_more.tiny_qwen_image21,
    "tiny-z-image": tiny_flow_more.tiny_z_image,
    "tiny-hidream": tiny_flow_more.tiny_hidream,
    "tiny-krea2": tiny_flow_more.tiny_krea2,
    "tiny-flux-kontext": tiny_flow2.tiny_flux_kontext,
    "tiny-chroma": tiny_flow2.tiny_chroma,
    "tiny-flux2": tiny_flow2.tiny_flux2,
    "tiny-flux2-klein": tiny_flow2.tiny_flux2_klein,
    "tiny-wan": tiny_video.tiny_wan,
}
TINY_LANGUAGE: dict[str, Callable[[], tuple[Any, Any]]] = {
    "tiny-llama": tiny_text.tiny_llama,
    "tiny-llava": tiny_text.tiny_llava,
}
TINY_MODELS = sorted([*TINY_DIFFUSION, *TINY_LANGUAGE])


# What a tiny diffusion model trains with when the user sets nothing (configs/tiny.yaml's settings): it
# learns in tens of steps at a high rate, and 10 denoising steps are plenty for its 64 px samples.
TINY_TRAINING = {"steps": 30, "min_lr": 1e-3, "validation_steps": 10}


def is_tiny(name: str) -> bool:
    return name in TINY_DIFFUSION or name in TINY_LANGUAGE


def build_tiny(name: str) -> Any:
    """A diffusers pipeline for tiny diffusion names, `(model, tokenizer_or_processor)` otherwise."""
    if name in TINY_DIFFUSION:
        return TINY_DIFFUSION[name]()
    return TINY_LANGUAGE[name]()


def save_tiny(name: str, folder: str | Path) -> Path:
    """Write a tiny model as a folder that stock `from_pretrained` reloads."""
    folder = Path(folder)
    built = build_tiny(name)
    if name in TINY_DIFFUSION:
        built.save_pretrained(folder, safe_serialization=True)
    else:
        model, processor = built
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
    return folder
