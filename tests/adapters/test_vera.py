"""VeRA: shared frozen projections, trained vectors; peft's math, gradients and file layout."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from personalize import adapters
from personalize.errors import UserError
from personalize.formats import read_adapter, save_adapter
from personalize.models import build_tiny

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(rank: int = 4):
    base, _ = build_tiny("tiny-llama")
    ours = copy.deepcopy(base)
    adapters.inject(ours, "vera", targets=TARGETS, name="a", rank=rank, seed=0)
    config = peft.VeraConfig(r=rank, target_modules=TARGETS, projection_prng_key=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), config)
    return base, ours, theirs


def _randomize(ours: nn.Module, theirs: nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    theirs_params = {
        n.replace(".default", "").removeprefix("base_model.model."): p for n, p in theirs.named_parameters()
    }
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                theirs_params[name.replace(".adapters.a", "").replace(".base_layer", "")].copy_(p)


def test_shared_matrices_are_peft_s_and_one_tensor_in_memory():
    _, ours, theirs = _pair()
    layers = [m for m in ours.modules() if isinstance(m, adapters.AdapterLayer)]
    first = layers[0].adapters["a"]
    assert all(
        layer.adapters["a"].vera_A.untyped_storage().data_ptr() == first.vera_A.untyped_storage().data_ptr()
        for layer in layers
    )
    (peft_a,) = {id(b): b for n, b in theirs.named_buffers() if "vera_A" in n}.values()
    torch.testing.assert_close(first.vera_A, peft_a[:, : first.vera_A.shape[1]])
    assert sum(p.numel() for p in adapters.trainable_parameters(ours)) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )


def test_one_training_step_matches_peft():
    _, ours, theirs = _pair()
    _randomize(ours, theirs)
    ids = torch.tensor([[1, 4, 9, 2, 7, 3]])
    loss_ours = ours(ids, labels=ids).loss
    loss_theirs = theirs(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-6, rtol=1e-5)
    loss_ours.backward()
    loss_theirs.backward()
    theirs_grads = {
        n.replace(".default", "").removeprefix("base_model.model."): p.grad
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            key = name.replace(".adapters.a", "").replace(".base_layer", "")
            torch.testing.assert_close(p.grad, theirs_grads[key], atol=1e-6, rtol=1e-4)
            checked += 1
    assert checked == len(theirs_grads) > 0


def test_peft_layout_loads_in_stock_peft_with_identical_logits(tmp_path):
    base, ours, theirs = _pair()
    _randomize(ours, theirs)
    save_adapter(tmp_path, {"model": adapters.state_dict(ours, "a")}, method="vera", family="llm", hyper={}, model=ours)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] and config["r"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        expected = ours(ids).logits
        assert not torch.allclose(expected, base(ids).logits, atol=1e-4)
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    peft_dir = tmp_path / "from-peft"  # and a file peft wrote reads back here with the same logits
    theirs.save_pretrained(peft_dir)
    fresh = copy.deepcopy(base)
    read_adapter(peft_dir, fresh).apply(fresh, name="b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_equals_forward_and_bad_targets_are_user_errors():
    _, ours, theirs = _pair()
    _randomize(ours, theirs)
    ids = torch.tensor([[2, 3, 5, 7]])
    with torch.no_grad():
        before = ours(ids).logits
        adapters.merge(ours, "a")
        torch.testing.assert_close(ours(ids).logits, before, atol=1e-5, rtol=1e-5)
    unet = build_tiny("tiny-sd15").unet
    with pytest.raises(UserError, match="Linear layers only"):
        adapters.inject(unet, "vera", targets="conv", rank=4)
