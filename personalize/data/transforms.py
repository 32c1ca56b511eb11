"""Per-item transform plan (pure, seeded) and its application to a PIL image (no torchvision).

A `Plan` fixes everything random about one item in one epoch: the bucket, the resized size, the crop
and the flip. It is a function of (seed, epoch, index) only, so workers, resumed runs and the cache
all agree. SDXL conditions on `original_size` and `crop_top_left`; after a flip the crop's left edge
is mirrored (left' = resized_width - left - width), so the coordinates describe the flipped image.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from personalize.data.buckets import Size, cover_size, crop_offset

TRANSFORM_VERSION = 1  # bump when the pixels a plan produces change (invalidates caches)


@dataclass(frozen=True)
class Plan:
    original_size: Size  # (h, w) of the decoded, oriented image
    resized: Size  # (h, w) after the aspect-preserving resize
    target_size: Size  # (H, W): the bucket
    crop_top_left: tuple[int, int]  # (top, left) in the resized image, after the flip
    flip: bool

    def tag(self) -> str:
        """Names the transform in cache keys and item keys."""
        return (
            f"v{TRANSFORM_VERSION}-o{self.original_size[0]}x{self.original_size[1]}"
            f"-t{self.target_size[0]}x{self.target_size[1]}-r{self.resized[0]}x{self.resized[1]}"
            f"-c{self.crop_top_left[0]}_{self.crop_top_left[1]}-{'f' if self.flip else 'n'}"
        )


def item_rng(kind: str, seed: int, epoch: int, index: int) -> random.Random:
    """A stream per (purpose, seed, epoch, index); str seeds hash with SHA-512, stable across processes."""
    return random.Random(f"{kind}:{seed}:{epoch}:{index}")


def decide_flip(probability: float, seed: int, epoch: int, index: int) -> bool:
    return probability > 0 and item_rng("flip", seed, epoch, index).random() < probability


def make_plan(
    size: Size,
    bucket: Size,
    seed: int,
    epoch: int,
    index: int,
    random_crop: bool = False,
    flip: bool = False,
) -> Plan:
    resized = cover_size(size, bucket)
    top, left = crop_offset(resized, bucket, item_rng("crop", seed, epoch, index) if random_crop else None)
    if flip:
        left = resized[1] - left - bucket[1]
    return Plan(size, resized, bucket, (top, left), flip)


def apply_plan(image: Image.Image, plan: Plan) -> Image.Image:
    """Resize (from the full or a draft-reduced decode), flip, crop (the offset refers to the flipped image)."""
    height, width = plan.resized
    resample = Image.Resampling.LANCZOS
    image = image.resize((width, height), resample, reducing_gap=3.0) if (height, width) != image.size[::-1] else image
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = plan.crop_top_left
    return image.crop((left, top, left + plan.target_size[1], top + plan.target_size[0]))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def mask_tensor(alpha: Image.Image) -> torch.Tensor:
    """ "L" alpha -> (1, H, W) float32 in [0, 1]."""
    array = np.asarray(alpha, dtype=np.uint8)  # (H, W)
    return torch.from_numpy(array.copy()).unsqueeze(0).float().div_(255.0)
