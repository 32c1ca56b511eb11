"""Small image helpers shared by sampling and generation: grids and reproducible PNG metadata."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin


def make_grid(images: Sequence[Image.Image], columns: int | None = None, gap: int = 2) -> Image.Image:
    """Tile images row-major into one picture (columns = ceil(sqrt(n)) by default)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width = max(image.width for image in images)
    height = max(image.height for image in images)
    grid = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (column * (width + gap), row * (height + gap)))
    return grid


def a1111_parameters(settings: Mapping[str, Any]) -> str:
    """The `parameters` text chunk that A1111/ComfyUI-style tools show and parse.

    Adapters become A1111 prompt tags `<lora:NAME:SCALE>`, NAME being the file A1111 would load: a file's
    stem, or for a run's output folder its name (the folder's A1111 file is `<folder name>.safetensors`).
    """
    tags = [f"<lora:{_a1111_name(adapter['path'])}:{adapter['scale']:g}>" for adapter in settings.get("adapters", [])]
    lines = [" ".join([str(settings.get("prompt", "")), *tags])]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings.get("steps"),
        "Sampler": settings.get("scheduler"),
        "CFG scale": settings.get("guidance"),
        "Seed": settings.get("seed"),
        "Size": f"{settings['width']}x{settings['height']}" if settings.get("width") else None,
        "Model": settings.get("model"),
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def _a1111_name(path: str | Path) -> str:
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def save_png(image: Image.Image, path: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Write a PNG atomically, with the settings that reproduce it in its text chunks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if settings:
        info.add_text("parameters", a1111_parameters(settings))
        info.add_text("personalize", json.dumps(dict(settings), sort_keys=True, default=str))
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG", pnginfo=info)
    os.replace(partial, path)
    return path


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The settings `save_png` wrote (empty when the image has none)."""
    with Image.open(path) as image:
        text = image.text.get("personalize") if hasattr(image, "text") else None
    return json.loads(text) if text else {}


def save_gif(
    frames: Sequence[Image.Image], path: str | Path, fps: float, settings: Mapping[str, Any] | None = None
) -> Path:
    """Write frames as a looping animated GIF atomically (video samples), the settings in its comment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    comment = json.dumps(dict(settings), sort_keys=True, default=str).encode() if settings else b""
    first, *rest = [frame.convert("RGB") for frame in frames]
    duration = max(20, round(1000 / fps)) if fps > 0 else 100  # milliseconds per frame (GIF: 10 ms steps)
    first.save(partial, format="GIF", save_all=True, append_images=rest, duration=duration, loop=0, comment=comment)
    os.replace(partial, path)
    return path
