"""Houlsby, Pfeiffer and Compacter adapters, and AdapterDrop, on tiny-llama."""

import pytest
import torch

from personalize import adapters
from personalize.adapters.bottleneck import adapter_drop_targets, drop_lower, phm_weight
from personalize.errors import UserError
from personalize.models import build_tiny

from .llm_training import steps

OPTIONS = {"houlsby": {}, "pfeiffer": {}, "compacter": {"phm_dim": 2}}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_trains_only_the_adapters_from_an_unchanged_start_and_reloads(method, tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    inputs = tokenizer(["what is two"], return_tensors="pt")
    before = model(**inputs).logits.detach()
    paths = adapters.inject(model, method, **OPTIONS[method])
    expected = ["o_proj", "down_proj"] if method == "houlsby" else ["down_proj"]
    assert sorted({path.rsplit(".", 1)[1] for path in paths}) == sorted(expected)
    torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)  # W_up = 0 at step 0
    losses, moved = steps(model, tokenizer, count=8, lr=1e-2)
    assert losses[-1] < losses[0]
    assert moved and all(".adapters.default." in key for key in moved)
    adapters.save_native(tmp_path, model, "default", method, OPTIONS[method])
    fresh = build_tiny("tiny-llama")[0]
    assert adapters.load_native(fresh, tmp_path) == method
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-5)
    with pytest.raises(UserError, match="cannot be merged"):
        adapters.merge(model, "default")


def test_pfeiffer_has_half_the_parameters_of_houlsby():
    counts = {}
    for method in ("houlsby", "pfeiffer"):
        model, _ = build_tiny("tiny-llama")
        adapters.inject(model, method, reduction=4)
        counts[method] = sum(p.numel() for p in adapters.trainable_parameters(model))
    assert counts["houlsby"] == 2 * counts["pfeiffer"]  # o_proj and down_proj both output D


def test_compacter_shares_its_rule_matrices_across_layers():
    model, _ = build_tiny("tiny-llama")
    paths = adapters.inject(model, "compacter", phm_dim=2)
    rules = {id(model.get_submodule(path).adapters["default"].phm_rule) for path in paths}
    assert len(paths) == 2 and len(rules) == 1
    # PHM: sum_i A_i (x) B_i, here checked against torch.kron
    rule, left, right = torch.randn(2, 2, 2), torch.randn(2, 3, 1), torch.randn(2, 1, 5)
    expected = sum(torch.kron(rule[i], left[i] @ right[i]) for i in range(2))
    torch.testing.assert_close(phm_weight(rule, left, right), expected)


def test_adapter_drop_leaves_the_lower_layers_without_adapters():
    model, tokenizer = build_tiny("tiny-llama")
    targets = adapter_drop_targets(model, r"(.*\.)?layers\.\d+\.mlp\.down_proj", 1)
    assert targets == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(UserError, match="drops every adapter layer"):
        adapter_drop_targets(model, targets, 2)
    # inference-time drop: switching the layer-0 adapter off equals having trained none there
    adapters.inject(model, "pfeiffer")
    with torch.no_grad():
        for param in adapters.trainable_parameters(model):
            param.normal_()
    inputs = tokenizer(["what is two"], return_tensors="pt")
    assert drop_lower(model, "default", 1) == ["model.layers.0.mlp.down_proj"]
    dropped = model(**inputs).logits
    upper_only, _ = build_tiny("tiny-llama")
    adapters.inject(upper_only, "pfeiffer", targets=targets)
    state = adapters.state_dict(model)
    adapters.load_state_dict(upper_only, {k: v for k, v in state.items() if "layers.0." not in k})
    torch.testing.assert_close(upper_only(**inputs).logits, dropped)
    adapters.set_scale(model, "default", 1.0)
    assert not torch.allclose(model(**inputs).logits, dropped)


def test_a_model_without_output_projections_is_one_clear_error():
    with pytest.raises(UserError, match="match no Linear"):
        adapters.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), "houlsby")
