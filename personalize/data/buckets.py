"""Aspect-ratio buckets (pure functions on sizes; sizes are (height, width) everywhere).

Buckets keep about `resolution^2` pixels: for each width W = k * step, H = floor(res^2 / W / step) * step,
with the aspect ratio limited to `max_aspect` (NovelAI's aspect-ratio bucketing, as kohya's scripts use
it). An image goes to the bucket whose log aspect ratio is nearest to its own, so it is scaled to cover
the bucket and cropped only along one side.
"""

from __future__ import annotations

import math
import random

Size = tuple[int, int]  # (height, width)


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[Size]:
    """All (H, W) buckets with H * W <= resolution^2, sides multiples of `step`, aspect <= max_aspect."""
    area = resolution * resolution
    sizes = {(resolution // step * step,) * 2}
    width = step
    while width * step <= area:
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((height, width))
            sizes.add((width, height))
        width += step
    return sorted(sizes)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket with the closest log aspect ratio (ties: the larger one)."""
    height, width = size
    target = math.log(width / height)
    return min(buckets, key=lambda bucket: (abs(math.log(bucket[1] / bucket[0]) - target), -bucket[0] * bucket[1]))


def choose_bucket(
    size: Size,
    resolution: int,
    step: int = 64,
    max_aspect: float = 2.0,
    bucketing: bool = True,
    no_upscale: bool = False,
) -> Size:
    """Target (H, W) for an image of `size`; no_upscale shrinks the bucket to fit inside the image."""
    height, width = size
    if no_upscale and height * width < resolution * resolution:
        resolution = int(math.sqrt(height * width))
    if bucketing:
        bucket = nearest_bucket(size, bucket_sizes(max(resolution, step), step, max_aspect))
    else:
        side = max(resolution // step * step, step)
        bucket = (side, side)
    if no_upscale:
        bucket = (min(bucket[0], height // step * step), min(bucket[1], width // step * step))
    return bucket


def cover_size(size: Size, bucket: Size) -> Size:
    """The image resized (aspect kept) to the smallest size that covers the bucket."""
    height, width = size
    scale = max(bucket[0] / height, bucket[1] / width)
    return max(bucket[0], round(height * scale)), max(bucket[1], round(width * scale))


def crop_offset(resized: Size, bucket: Size, rng: random.Random | None = None) -> tuple[int, int]:
    """(top, left) of the crop: centered, or uniform when an rng is given."""
    spare_h, spare_w = resized[0] - bucket[0], resized[1] - bucket[1]
    if rng is None:
        return spare_h // 2, spare_w // 2
    return rng.randint(0, spare_h), rng.randint(0, spare_w)
