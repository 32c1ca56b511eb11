"""Every method `personalize train` offers writes an output that `load_adapter` and `generate --adapter` read."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from personalize.cli import main
from personalize.pipelines import load_adapter, unload_adapter
from personalize.trainers.conditioning.config import CONDITIONING_METHODS
from personalize.trainers.diffusion import config

from .conftest import CAT

QUICK = ["--model", "tiny-sd15", "--steps", "2", "--lr", "1e-2", "--resolution", "64"]
QUICK += ["--set", "validation_images=0", "--set", "checkpoint_every=0"]
DEFAULT_RUN = ("lora", "bitfit", "norm", "full", "textual-inversion")
# Every method `personalize train` takes for a text-to-image model, except the conditioning adapters
# (ControlNet & co. are loaded with their own flags, not as adapters).
METHODS = tuple(m for m in (*config.METHODS, *config.TOKEN_METHODS) if m not in CONDITIONING_METHODS)


def _unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 500, context).sample


@pytest.mark.parametrize(
    "method", [m if m in DEFAULT_RUN else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_every_method_output_loads_and_generates(tiny_pipelines, tmp_path, method):
    out = tmp_path / "run"
    assert main(["train", "--images", str(CAT), "--output", str(out), "--method", method, *QUICK]) == 0

    image = tmp_path / "image.png"
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "a photo of sks cat", "--steps", "2"]
    assert main([*argv, "--adapter", str(out), "--output", str(image)]) == 0
    assert Image.open(image).size == (64, 64)

    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    base = _unet_output(pipe)
    name = load_adapter(pipe, out)
    if method != "textual-inversion":  # a token changes prompts, not the UNet
        assert not torch.equal(_unet_output(pipe), base), f"{method}: the loaded adapter changes nothing"
    unload_adapter(pipe, name)
    assert torch.equal(_unet_output(pipe), base)  # unloading restores the base exactly
