"""Image folders for the data tests, built with PIL in tmp_path (nothing is shipped or downloaded)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A reproducible noisy image (noise makes resize/crop/flip mistakes visible)."""
    rng = np.random.default_rng(seed)
    channels = len(mode) if mode in ("RGB", "RGBA", "LA") else 1
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode=None).convert(mode)


@pytest.fixture
def make_image():
    """The `noise_image` builder, for tests (conftest modules cannot be imported by name)."""
    return noise_image


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(96, 64, seed=1).save(folder / "a.jpg", quality=95)
    noise_image(64, 96, seed=2).save(folder / "b.png")
    noise_image(80, 80, seed=3).save(folder / "c.webp", lossless=True)
    return folder
