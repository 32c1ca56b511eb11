"""Files written by lycoris-lora (LoKr, LoHa, LoCon) load here and compute what LyCORIS computes."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file

from personalize import adapters
from personalize.formats import read_adapter, save_adapter

from .helpers import unet_inputs, with_adapter

lycoris = pytest.importorskip("lycoris")


@pytest.mark.parametrize(
    ("algo", "options"),
    [
        ("lokr", {"factor": 4}),
        ("loha", {}),
        ("lokr", {"factor": 2, "use_tucker": True, "conv_dim": 4, "conv_alpha": 2}),  # lokr_t2 cores on 3x3 convs
        pytest.param("locon", {}, marks=pytest.mark.slow),
        pytest.param("lokr", {"factor": -1, "full_matrix": True}, marks=pytest.mark.slow),
    ],
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
    if options.get("use_tucker"):
        assert any(key.endswith(".lokr_t2") for key in load_file(str(file)))
    loaded = copy.deepcopy(pipe.unet)
    read.apply(loaded)
    with torch.no_grad():
        got = loaded(**inputs).sample
        base = pipe.unet(**inputs).sample
    assert not torch.allclose(expected, base, atol=1e-4)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["lokr", "loha", "dora"])
def test_lycoris_reads_our_kohya_files_with_identical_outputs(tiny_pipelines, tmp_path, method):
    """LyCORIS's own loader (module names under our `lora_unet` prefix) computes what our adapter does."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    pipe = tiny_pipelines("tiny-sd15")
    ours, components = with_adapter(pipe, method, text=False)
    save_adapter(tmp_path, components, method=method, family="sd1", hyper={}, output_name="x")
    unet = copy.deepcopy(pipe.unet)
    previous = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, str(tmp_path / "x.safetensors"), unet)
    finally:
        LycorisNetwork.LORA_PREFIX = previous
    assert len(network.loras) == len(adapters.group_by_module(components["unet"]))
    network.apply_to()
    network.load_state_dict(load_file(tmp_path / "x.safetensors"), strict=False)
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        assert torch.allclose(unet(**inputs).sample, ours.unet(**inputs).sample, atol=1e-5)
