"""Adapters with random weights on the tiny pipelines, saved in the layouts merge reads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from personalize.formats import save_adapter

sys.path.insert(0, str(Path(__file__).parent))
from merge_helpers import random_adapter  # noqa: E402


@pytest.fixture(scope="package")
def sd15_inputs(tiny_pipelines, tmp_path_factory):
    """Three LoRAs (a diffusers folder, a kohya file, a rank-8 diffusers folder), a LoHa and a LoKr file."""
    pipe = tiny_pipelines("tiny-sd15")
    root = tmp_path_factory.mktemp("merge-inputs")
    made = {}
    for name, method, seed, hyper in (
        ("a", "lora", 1, {"rank": 4, "alpha": 2}),
        ("b", "lora", 2, {"rank": 4, "alpha": 8}),
        ("r8", "lora", 3, {"rank": 8, "alpha": 8}),
        ("loha", "loha", 4, {"rank": 2, "alpha": 2}),
        ("lokr", "lokr", 5, {"rank": 2, "alpha": 2, "factor": 4}),
    ):
        components = random_adapter(pipe, method, seed, **hyper)
        save_adapter(root / name, components, method=method, family="sd1", hyper=hyper, output_name=name)
        made[name] = components
    paths = {
        "a": root / "a",  # folder: diffusers file (+ kohya)
        "b": root / "b" / "b.safetensors",  # kohya file
        "r8": root / "r8" / "pytorch_lora_weights.safetensors",
        "loha": root / "loha" / "loha.safetensors",
        "lokr": root / "lokr" / "lokr.safetensors",
    }
    return paths, made
