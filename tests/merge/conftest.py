"""Adapters with random weights on the tiny pipelines, saved in the layouts merge reads."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from personalize import adapters
from personalize.formats import save_adapter

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_adapter(pipe, method, seed, components=("unet", "text_encoder"), std=0.1, unet_targets="attention", **hyper):
    """{component: canonical state dict} of `method` with random non-zero weights."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component in components:
            module = copy.deepcopy(getattr(pipe, component))
            targets = unet_targets if component == "unet" else None
            adapters.inject(module, method, targets=targets, name="made", **hyper)
            with torch.no_grad():
                for parameter in adapters.trainable_parameters(module):
                    parameter.normal_(0, std)
            out[component] = adapters.state_dict(module, "made")
    return out


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
