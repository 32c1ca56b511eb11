"""`personalize train --method vera` on the tiny UNet: trained vectors in adapter.safetensors, loaded back
by personalize.pipelines.load_adapter with the same outputs as the adapter attached by hand."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file

from personalize import adapters
from personalize.cli import main

from ..formats.helpers import unet_inputs
from .conftest import CAT


def test_cli_trains_vera_on_the_unet_and_load_adapter_reads_it(tmp_path, cache_dir, tiny_pipelines):
    out = tmp_path / "cat"
    argv = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--method", "vera", "--steps", "2"]
    argv += ["--resolution", "64", "--output", str(out), "--set", "method_options.rank=8"]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1", "--set", "validation_images=1"]
    assert main(argv) == 0
    tensors = load_file(str(out / "adapter.safetensors"))
    lambda_b = {k: v for k, v in tensors.items() if k.endswith(".vera_lambda_b")}
    assert lambda_b and all(k.startswith("unet.") for k in lambda_b)
    assert all(v.abs().sum() > 0 for v in lambda_b.values())  # trained away from their zero start
    assert {v.shape[0] for k, v in tensors.items() if k.endswith(".vera_A")} == {8}

    from personalize.pipelines import load_adapter

    pipe = tiny_pipelines("tiny-sd15")
    inputs = unet_inputs(pipe)
    loaded = copy.deepcopy(pipe)
    load_adapter(loaded, out)
    by_hand = copy.deepcopy(pipe.unet)
    unet_state = {k.removeprefix("unet."): v for k, v in tensors.items()}
    adapters.inject_from_state_dict(by_hand, unet_state, name="x")
    with torch.no_grad():
        got = loaded.unet(**inputs).sample
        assert not torch.allclose(got, pipe.unet(**inputs).sample, atol=1e-6)
        torch.testing.assert_close(got, by_hand(**inputs).sample)
