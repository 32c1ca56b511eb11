"""`personalize train --method oft|boft` on the tiny UNet: LyCORIS keys that LyCORIS itself and
personalize.pipelines.load_adapter read back with the trained model's outputs."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from personalize import adapters
from personalize.cli import main

from .conftest import CAT


@pytest.mark.parametrize(("method", "shape_dims"), [("oft", 3), ("boft", 4)])
def test_cli_trains_oft_and_the_file_loads_in_lycoris_and_diffusers(
    method, shape_dims, tmp_path, cache_dir, tiny_pipelines
):
    out = tmp_path / "cat"
    argv = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--method", method, "--steps", "2"]
    argv += ["--resolution", "64", "--output", str(out), "--lr", "1e-2", "--set", "method_options.block_size=8"]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1", "--set", "validation_images=1"]
    assert main(argv) == 0
    file = out / "cat.safetensors"
    tensors = load_file(str(file))
    blocks = {k: v for k, v in tensors.items() if k.endswith(".oft_blocks")}
    assert blocks and all(k.startswith("lora_unet_") and v.dim() == shape_dims for k, v in blocks.items())
    assert all(v.shape[-1] == 8 and v.abs().sum() > 0 for v in blocks.values())  # trained, not zeros
    assert not any(k.endswith("on_input") for k in tensors)  # output-side: LyCORIS's form
    with safe_open(str(file), framework="pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert args["algo"] == {"oft": "diag-oft", "boft": "boft"}[method]

    from personalize.pipelines import load_adapter

    from ..formats.helpers import unet_inputs

    pipe = tiny_pipelines("tiny-sd15")
    inputs = unet_inputs(pipe)
    loaded = copy.deepcopy(pipe)
    load_adapter(loaded, out)
    with torch.no_grad():
        ours = loaded.unet(**inputs).sample
        assert not torch.allclose(ours, pipe.unet(**inputs).sample, atol=1e-6)

    lycoris = pytest.importorskip("lycoris")
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    unet = copy.deepcopy(pipe.unet)
    previous = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, str(file), unet)
    finally:
        LycorisNetwork.LORA_PREFIX = previous
    assert len(network.loras) == len(blocks) and lycoris is not None
    network.apply_to()
    network.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, ours, atol=1e-5, rtol=1e-5)
    assert adapters.describe(loaded.unet).startswith("cat: " + method)
