"""Several adapters of different layouts composed at load time by `personalize generate --adapter a:W ...`:
a merged LoRA folder (with a subject's token) and a kohya LoKr file, each at its own scale."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

import personalize.models
from personalize.cli import main
from personalize.images import read_png_settings
from personalize.merge import merge_adapters


@pytest.mark.slow  # generation through the CLI; test_generate_adapters covers the flag in the default run
def test_generate_composes_a_merge_and_a_lycoris_file(sd15_inputs, tiny_pipelines, tmp_path, monkeypatch):
    monkeypatch.setattr(personalize.models, "load_pipeline", lambda name, **_: copy.deepcopy(tiny_pipelines(name)))
    paths, _ = sd15_inputs
    merge_adapters([(paths["a"], 1.0), (paths["b"], 1.0)], method="svd", output=tmp_path / "merged")
    argv = [
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a photo",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
    ]
    both = [*argv, "--adapter", f"{tmp_path / 'merged'}:0.8", "--adapter", f"{paths['lokr']}:0.6"]
    assert main([*both, "--output", str(tmp_path / "both.png")]) == 0
    assert main([*argv, "--adapter", f"{tmp_path / 'merged'}:0.8", "--output", str(tmp_path / "one.png")]) == 0
    recorded = read_png_settings(tmp_path / "both.png")["adapters"]
    assert [(a["path"], a["scale"]) for a in recorded] == [(str(tmp_path / "merged"), 0.8), (str(paths["lokr"]), 0.6)]
    pixels = [np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("both", "one")]
    assert not np.array_equal(*pixels)
