"""`personalize train --method difffit` on the tiny UNet: gammas, biases and norms in adapter.safetensors,
read back by personalize.pipelines.load_adapter (scalable, unloadable)."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file

from personalize.cli import main

from ..formats.helpers import unet_inputs
from .conftest import CAT


def test_cli_trains_difffit_and_load_adapter_reads_it(tmp_path, cache_dir, tiny_pipelines):
    out = tmp_path / "cat"
    argv = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--method", "difffit", "--steps", "2"]
    argv += ["--resolution", "64", "--output", str(out), "--lr", "1e-2"]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1", "--set", "validation_images=1"]
    assert main(argv) == 0
    tensors = load_file(str(out / "adapter.safetensors"))
    gammas = {k: v for k, v in tensors.items() if k.endswith(".difffit_gamma")}
    assert gammas and any(not torch.equal(v, torch.ones_like(v)) for v in gammas.values())
    assert any(k.endswith("norm1.weight") for k in tensors)
    assert any(k.endswith("conv2.base_layer.bias") for k in tensors)

    from personalize.pipelines import load_adapter, set_adapter_scale, unload_adapter

    pipe = tiny_pipelines("tiny-sd15")
    inputs = unet_inputs(pipe)
    loaded = copy.deepcopy(pipe)
    load_adapter(loaded, out, name="fit")
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
        assert not torch.allclose(loaded.unet(**inputs).sample, base, atol=1e-5)
        set_adapter_scale(loaded, "fit", 0.0)
        torch.testing.assert_close(loaded.unet(**inputs).sample, base, atol=1e-5, rtol=1e-5)
        unload_adapter(loaded, "fit")
        assert torch.equal(loaded.unet(**inputs).sample, base)
