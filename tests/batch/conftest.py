"""Subjects for batch tests: small folders copied from examples/cat, and job settings that train in seconds."""

import shutil
from pathlib import Path

import pytest

CAT = Path(__file__).resolve().parents[2] / "examples" / "cat"
# tiny-sd15 at 64 px, 2 steps with a checkpoint after each, prior preservation on 2 class images of 1 denoising step
TINY_DEFAULTS = {
    "model": "tiny-sd15",
    "rank": 4,
    "alpha": 4,
    "lr": 1e-3,
    "steps": 2,
    "checkpoint_every": 1,
    "prior_preservation": True,
    "class_images": 2,
    "class_image_steps": 1,
    "validation_images": 0,
    "resolution": 64,
}


def make_subject(folder: Path, count: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(CAT.glob("*.jpg"))[start : start + count]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture
def photos(tmp_path):
    """photos/sks_cat (3 images) and photos/zwx_dog (2 images)."""
    root = tmp_path / "photos"
    make_subject(root / "sks_cat", 3)
    make_subject(root / "zwx_dog", 2, start=3)
    return root


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def tiny_yaml(extra_jobs: str = "  - images: photos/*\n", **overrides) -> str:
    settings = {**TINY_DEFAULTS, **overrides}
    lines = [f"{key}: {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\njobs:\n" + extra_jobs
