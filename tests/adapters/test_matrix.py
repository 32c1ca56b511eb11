"""Method x base layer matrix: inject, forward, train step, merge/unmerge, remove, save/load, stacking."""

from __future__ import annotations

import copy

import pytest
import torch

from personalize import adapters
from personalize.models.tiny_layers import LAYERS, Holder, build_layer, randomize, sample_input

HYPER = {
    "lora": {"rank": 4, "alpha": 2},
    "dora": {"rank": 4, "alpha": 4},
    "loha": {"rank": 4, "alpha": 2},
    "lokr": {"rank": 2, "alpha": 1, "factor": 4},
    "krona": {"a1": 4, "a2": 4},
    "ia3": {},
    "loha-tucker": {"rank": 4, "alpha": 2, "tucker": True},
    "lokr-both": {"rank": 1, "alpha": 1, "factor": 4, "decompose_both": True},
    "lokr-tucker": {"rank": 1, "alpha": 1, "factor": 4, "tucker": True},
    "lora-rsfa": {"rank": 4, "alpha": 2, "rslora": True, "fa": True, "init": "gaussian"},
}
ALLOWED = {
    "lora": LAYERS,
    "dora": ("linear", "conv3x3", "conv1x1", "linear4bit", "linear8bit", "conv4bit"),
    "loha": ("linear", "conv3x3", "conv1x1", "linear4bit", "linear8bit", "conv4bit"),
    "lokr": ("linear", "conv3x3", "conv1x1", "linear4bit", "linear8bit", "conv4bit"),
    "krona": ("linear", "conv3x3", "conv1x1", "linear4bit", "linear8bit", "conv4bit"),
    "ia3": ("linear", "conv3x3", "conv1x1", "linear4bit", "linear8bit", "conv4bit"),
    "loha-tucker": ("conv3x3",),
    "lokr-both": ("linear", "conv3x3"),
    "lokr-tucker": ("conv3x3", "conv4bit"),
    "lora-rsfa": ("linear", "conv3x3", "embedding"),
}
CASES = [(method, layer) for method, layers in ALLOWED.items() for layer in layers]
# 4-bit and 8-bit bases re-quantize on merge: merged outputs only approximate the unmerged ones.
MERGE_TOLERANCE = {"linear4bit": 0.25, "linear8bit": 0.05, "conv4bit": 0.25}


def _model(method: str, layer: str, name: str = "a", seed: int = 2) -> Holder:
    model = Holder(build_layer(layer))
    paths = adapters.inject(model, method.split("-")[0], targets="layer", name=name, **HYPER[method])
    assert paths == ["block.layer"]
    randomize(model.block.layer.adapters[name], seed)
    return model


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize(("method", "layer"), CASES)
def test_inject_forward_and_train_step(method, layer):
    base = Holder(build_layer(layer))
    x = sample_input(layer)
    base_out = base(x)
    model = _model(method, layer)
    out = model(x)
    assert out.shape == base_out.shape and not torch.allclose(out, base_out)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = adapters.trainable_parameters(model)
    assert trainable and all(p.requires_grad for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (".adapters." in n and p.requires_grad), n
    if method == "lora-rsfa":  # LoRA-FA: A stays frozen; rsLoRA: effective alpha = alpha * sqrt(r)
        adapter = model.block.layer.adapters["a"]
        assert not adapter.lora_down.weight.requires_grad and float(adapter.alpha) == pytest.approx(2 * 2.0)


@pytest.mark.parametrize(("method", "layer"), CASES)
def test_merge_unmerge_remove(method, layer):
    x = sample_input(layer)
    reference = Holder(build_layer(layer))
    base_out = reference(x)
    model = _model(method, layer)
    with torch.no_grad():
        unmerged_out = model(x)
        adapters.merge(model, "a")
        merged_out = model(x)
        assert _relative(merged_out, unmerged_out) < MERGE_TOLERANCE.get(layer, 1e-5)
        adapters.unmerge(model, "a")
        assert _relative(model(x), unmerged_out) < MERGE_TOLERANCE.get(layer, 1e-5)
    adapters.remove(model, "a")
    assert type(model.block.layer) is type(reference.block.layer)
    if layer not in MERGE_TOLERANCE:
        torch.testing.assert_close(model(x), base_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("method", "layer"), CASES)
def test_remove_without_merge_is_exact(method, layer):
    x = sample_input(layer)
    base_out = Holder(build_layer(layer))(x)
    model = _model(method, layer)
    adapters.remove(model)
    assert torch.equal(model(x), base_out)


@pytest.mark.parametrize(("method", "layer"), CASES)
def test_state_dict_round_trip(method, layer):
    x = sample_input(layer)
    model = _model(method, layer, seed=3)
    saved = {k: v.clone() for k, v in adapters.state_dict(model, "a").items()}
    assert all(k.startswith("block.layer.") for k in saved)
    fresh = _model(method, layer, seed=4)
    assert not torch.allclose(fresh(x), model(x))
    adapters.load_state_dict(fresh, saved, "a")
    assert torch.equal(fresh(x), model(x))
    rebuilt = Holder(build_layer(layer))
    adapters.inject_from_state_dict(rebuilt, saved, "a")
    assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize(("method", "layer"), CASES)
def test_two_adapters_stack_with_independent_scales(method, layer):
    x = sample_input(layer)
    base_out = Holder(build_layer(layer))(x)
    model = _model(method, layer, name="a", seed=5)
    adapters.inject(model, method.split("-")[0], targets="layer", name="b", **HYPER[method])
    randomize(model.block.layer.adapters["b"], seed=6)
    with torch.no_grad():
        both = model(x)
        adapters.set_scale(model, "b", 0.0)
        only_a = model(x)
        adapters.set_scale(model, "b", 1.0)
        adapters.set_scale(model, "a", 0.0)
        only_b = model(x)
        adapters.set_scale(model, "a", 0.5)
        half_a = model(x) - only_b
    torch.testing.assert_close(both - base_out, (only_a - base_out) + (only_b - base_out), rtol=1e-4, atol=1e-4)
    if method != "dora":  # DoRA's magnitude re-normalization is not linear in the scale
        torch.testing.assert_close(half_a, 0.5 * (only_a - base_out), rtol=1e-4, atol=1e-4)


def test_errors_are_one_line_user_errors():
    from personalize.errors import UserError

    model = Holder(build_layer("linear"))
    with pytest.raises(UserError, match="nearest layers: block.layer"):
        adapters.inject(model, "lora", targets="block.layr")
    with pytest.raises(UserError, match="did you mean 'rank'"):
        adapters.inject(model, "lora", targets="layer", rnak=4)
    with pytest.raises(UserError, match="unknown adapter method"):
        adapters.inject(model, "lorra", targets="layer")
    adapters.inject(model, "lora", targets="layer", name="a")
    with pytest.raises(UserError, match="already on this model"):
        adapters.inject(model, "lora", targets="layer", name="a")
    other = copy.deepcopy(model)
    adapters.remove(other)
    adapters.inject(other, "lora", targets="layer", name="a", rank=8)
    with pytest.raises(UserError, match="shape"):
        adapters.load_state_dict(other, adapters.state_dict(model, "a"), "a")
    with pytest.raises(UserError, match="missing"):
        adapters.load_state_dict(other, {}, "a")


def test_merge_refuses_nan():
    from personalize.errors import UserError

    model = _model("lora", "linear")
    weight = model.block.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.block.layer.adapters["a"].lora_up.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        adapters.merge(model, "a")
    assert torch.equal(model.block.layer.base_layer.weight, weight)
