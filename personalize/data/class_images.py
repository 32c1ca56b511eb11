"""Class images for prior preservation (DreamBooth, arXiv 2208.12242): generated once, kept, resumable.

Image i is `class-{i:05d}.png`, generated from seed `seed + i` with a CPU generator, so an interrupted
run that resumes produces the same set as one that never stopped. Every PNG carries its prompt and
seed in its metadata (`personalize.images.save_png`); files already in the folder count toward `count`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from personalize.images import save_png

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def existing_images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def class_image_name(index: int) -> str:
    return f"class-{index:05d}.png"


def ensure_class_images(
    pipe: Any,
    prompt: str,
    folder: str | Path,
    count: int,
    batch_size: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    **pipe_kwargs: Any,
) -> list[Path]:
    """Make `folder` hold at least `count` images, generating only the missing ones; returns `count` paths."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    existing = existing_images(folder)
    need = count - len(existing)
    if need <= 0:
        return existing[:count]
    names = {path.name for path in existing}
    indices: list[int] = []
    index = 0
    while len(indices) < need:
        if class_image_name(index) not in names:
            indices.append(index)
        index += 1
    model = getattr(getattr(pipe, "config", None), "_name_or_path", "") or type(pipe).__name__
    with tqdm(total=need, desc="class images", unit="img") as progress:
        for start in range(0, need, batch_size):
            chunk = indices[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed + number) for number in chunk]
            output = pipe(
                prompt=[prompt] * len(chunk),
                generator=generators,
                num_inference_steps=num_inference_steps,
                output_type="pil",
                **pipe_kwargs,
            )
            for number, image in zip(chunk, output.images):
                settings = {
                    "prompt": prompt,
                    "seed": seed + number,
                    "steps": num_inference_steps,
                    "width": image.width,
                    "height": image.height,
                    "model": model,
                }
                save_png(image, folder / class_image_name(number), settings)
            progress.update(len(chunk))
    return existing_images(folder)[:count]
