"""A folder of class folders -> normalized pixel tensors and labels, with the same robust intake as the
diffusion trainers (personalize.data.decode: EXIF, alpha, odd modes; unreadable files skipped by name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from personalize.data.decode import BadImage, decode, read_bytes
from personalize.data.sources import SIDECAR_SUFFIXES
from personalize.errors import UserError


@dataclass
class Images:
    pixels: torch.Tensor  # (N, 3, S, S), normalized
    labels: torch.Tensor  # (N,)
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def class_folders(folder: str | Path) -> list[tuple[str, Path]]:
    """(class name, folder) for every sub-folder, sorted by name; at least two classes."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {folder} is not a folder; pass a folder with one sub-folder per class")
    classes = sorted((p.name, p) for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(
            f"{folder} has {len(classes)} class folder(s); classification needs at least two (e.g. pets/cat, pets/dog)"
        )
    return classes


def preprocess(image: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Shorter side to `size` (bicubic), center crop, [0, 1], normalized: (3, size, size)."""
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), 3)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)  # (3, S, S)
    return (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def read_image(path: Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return preprocess(decode(read_bytes(path)).image, size, mean, std)


def read_classes(folder: str | Path, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple:
    """(class names, Images); a class left without a readable image is an error naming it."""
    classes = class_folders(folder)
    pixels, labels, paths, skipped = [], [], [], []
    for label, (name, path) in enumerate(classes):
        found = 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.suffix.lower() in SIDECAR_SUFFIXES or file.name.startswith("."):
                continue
            try:
                pixels.append(read_image(file, size, mean, std))
            except BadImage as reason:
                skipped.append((file, str(reason)))
                continue
            labels.append(label)
            paths.append(file)
            found += 1
        if not found:
            raise UserError(f"class '{name}' ({path}) has no readable image; add some or remove the folder")
    images = Images(torch.stack(pixels), torch.tensor(labels), paths, skipped)
    return [name for name, _ in classes], images


def split(labels: torch.Tensor, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): `val_split` of each class held out, at least one image of each class trains."""
    if not 0.0 <= val_split < 1.0:
        raise UserError(f"--val-split is a fraction in [0, 1) (got {val_split})")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held = min(int(round(len(members) * val_split)), len(members) - 1)
        val.append(members[:held])
        train.append(members[held:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values
