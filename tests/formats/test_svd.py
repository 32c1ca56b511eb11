"""SVD to LoRA: full rank reproduces any delta; lower ranks report their relative error."""

from __future__ import annotations

import pytest
import torch

from personalize import adapters
from personalize.formats.svd import adapter_to_lora, checkpoint_deltas, lora_from_delta, module_delta

from .helpers import with_adapter


@pytest.mark.parametrize("method", ["loha", "lokr", "krona", "dora", "locon", "ia3"])
def test_full_rank_svd_reproduces_the_delta(tiny_pipelines, method):
    pipe = tiny_pipelines("tiny-sd15")
    ours, components = with_adapter(pipe, method, text=False)
    keep = ("down_blocks.0.resnets.0.", "down_blocks.1.attentions.0.transformer_blocks.0.", "mid_block.resnets.0.conv")
    sd = {k: v for k, v in components["unet"].items() if k.startswith(keep)}  # linear and conv layers, kept small
    lora, report = adapter_to_lora(sd, ours.unet, rank=10_000)
    assert report["overall"] < 1e-5 and set(report) == set(adapters.group_by_module(sd)) | {"overall"}
    groups = adapters.group_by_module(sd)
    for path, group in groups.items():
        base = ours.unet.get_submodule(path).base_layer
        delta = module_delta(group, base)
        rebuilt = module_delta(adapters.group_by_module(lora)[path], base)
        assert float((rebuilt - delta).norm()) <= 1e-4 * float(delta.norm()) + 1e-7, path


def test_low_rank_error_is_reported_and_optimal():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(16, 8, 3, 3, generator=generator)
    down, up, error = lora_from_delta(delta, rank=4)
    assert down.shape == (4, 8, 3, 3) and up.shape == (16, 4, 1, 1)
    singular = torch.linalg.svdvals(delta.flatten(1))
    expected = float(singular[4:].norm() / singular.norm())  # Eckart-Young
    assert error == pytest.approx(expected, rel=1e-4)
    assert 0 < error < 1


def test_difference_of_two_checkpoints():
    generator = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(8, 6, generator=generator), "a.bias": torch.zeros(8)}
    update = torch.randn(8, 2, generator=generator) @ torch.randn(2, 6, generator=generator)
    tuned = {"a.weight": base["a.weight"] + update, "a.bias": torch.ones(8)}
    deltas = checkpoint_deltas(tuned, base)
    assert set(deltas) == {"a"}
    down, up, error = lora_from_delta(deltas["a"], rank=2)
    assert error < 1e-5 and torch.allclose(up @ down, update, atol=1e-5)
