"""Files written by lycoris-lora (LoKr, LoHa, LoCon) load here and compute what LyCORIS computes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from personalize.formats import read_adapter

from .helpers import unet_inputs

lycoris = pytest.importorskip("lycoris")


@pytest.mark.parametrize(
    ("algo", "options"),
    [("lokr", {"factor": 4}), ("loha", {}), ("locon", {}), ("lokr", {"factor": -1, "full_matrix": True})],
)
def test_lycoris_files_load_with_identical_outputs(tiny_pipelines, tmp_path, algo, options):
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    pipe = tiny_pipelines("tiny-sd15")
    unet = copy.deepcopy(pipe.unet)
    network = lycoris.create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset="full", **options)
    network.apply_to()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        expected = unet(**inputs).sample
    file = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(file), torch.float32, {})
    read = read_adapter(file, pipe.unet)
    assert read.layout == "kohya"
    loaded = copy.deepcopy(pipe.unet)
    read.apply(loaded)
    with torch.no_grad():
        got = loaded(**inputs).sample
        base = pipe.unet(**inputs).sample
    assert not torch.allclose(expected, base, atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-5)
