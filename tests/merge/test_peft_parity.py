"""The per-layer arithmetic against peft's `add_weighted_adapter` on the same LoRAs: same deltas.

peft's linear / ties / dare_linear / dare_ties work on the A and B factors; its *_svd variants (and svd)
on the full deltas, compressed to `svd_rank`; cat concatenates. DARE's masks come from the same random
stream: peft's Bernoulli draws are pointed at a generator with the same seed as ours (peft would otherwise
share torch's global generator with the new adapter's initialization), and we go layer by layer in the
model's module order, A's masks before B's, as peft does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from personalize.adapters import merge_ops as ops
from personalize.merge.layers import Term, merge_layer

peft = pytest.importorskip("peft")

WEIGHTS = [0.7, 0.5, -0.3]
NAMES = ["s0", "s1", "s2"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(24, 20)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.lin2 = nn.Linear(20, 16)


def _peft_model(rank: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = None
    for index, name in enumerate(NAMES):
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank + index, target_modules=["lin1", "conv", "lin2"])
        if model is None:
            model = peft.get_peft_model(Net(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for name in NAMES:
                    for weight in (module.lora_A[name].weight, module.lora_B[name].weight):
                        weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def _ours(layer: nn.Module, method: str, rank: int | None, generator: torch.Generator) -> torch.Tensor:
    terms = [
        Term(w, layer.scaling[name], down=layer.lora_A[name].weight.detach(), up=layer.lora_B[name].weight.detach())
        for name, w in zip(NAMES, WEIGHTS)
    ]
    merged = merge_layer(terms, method, rank, 0.5, generator, full=False)
    return ops.flat_delta(merged.down, merged.up).reshape(layer.get_base_layer().weight.shape)


CASES = [  # (peft combination_type, ours, svd_rank / our rank)
    ("linear", "linear", None),
    ("cat", "cat", None),
    ("svd", "svd", 6),
    ("ties", "ties", None),
    ("dare_linear", "dare", None),
    ("dare_ties", "dare-ties", None),
    ("ties_svd", "ties", 5),
    ("dare_linear_svd", "dare", 5),
    ("dare_ties_svd", "dare-ties", 5),
]


@pytest.mark.parametrize(("peft_type", "method", "rank"), CASES, ids=[c[0] for c in CASES])
def test_same_deltas_as_peft(peft_type, method, rank, monkeypatch):
    model = _peft_model()
    theirs = torch.Generator().manual_seed(123)
    merge_utils = peft.utils.merge_utils

    def random_pruning(tensor, density, rescale):  # peft's definition, drawing from `theirs`
        kept = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=theirs)
        return kept / density if rescale else kept

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    model.add_weighted_adapter(NAMES, WEIGHTS, "merged", combination_type=peft_type, svd_rank=rank, density=0.5)
    generator = torch.Generator().manual_seed(123)
    for path, layer in _lora_layers(model):
        expected = layer.get_delta_weight("merged").detach()
        ours = _ours(layer, method, rank, generator)
        scale = float(expected.norm())
        assert scale > 0, path
        assert float((ours - expected).norm()) <= 1e-4 * scale, (path, peft_type)


def test_cat_is_exact_and_linear_reports_its_error():
    model = _peft_model()
    path, layer = _lora_layers(model)[0]
    terms = [
        Term(w, layer.scaling[n], down=layer.lora_A[n].weight.detach(), up=layer.lora_B[n].weight.detach())
        for n, w in zip(NAMES, WEIGHTS)
    ]
    exact = sum(t.weight * t.flat() for t in terms)
    cat = merge_layer(terms, "cat", None, 1.0, None, full=False)
    assert cat.error == 0.0 and torch.allclose(ops.flat_delta(cat.down, cat.up), exact, atol=1e-4)
    linear = merge_layer(terms, "linear", None, 1.0, None, full=False)
    measured = float((ops.flat_delta(linear.down, linear.up) - exact).norm() / exact.norm())
    assert linear.error == pytest.approx(measured, rel=1e-4) and linear.error > 0.1
    assert cat.norm == pytest.approx(float(exact.norm()), rel=1e-4)
    left, right = torch.randn(20, 7), torch.randn(7, 24)
    distance = ops.factored_distance(linear.down, linear.up, left, right)
    assert distance == pytest.approx(float((ops.flat_delta(linear.down, linear.up) - left @ right).norm()), rel=1e-4)


def test_svd_of_product_equals_svd_of_the_full_matrix():
    generator = torch.Generator().manual_seed(2)
    left, right = torch.randn(40, 12, generator=generator), torch.randn(12, 30, generator=generator)
    down, up, singular = ops.svd_of_product(left, right, 5)
    full_down, full_up, full_singular = ops.svd_of_delta(left @ right, 5)
    assert torch.allclose(up @ down, full_up @ full_down, atol=1e-4)
    assert torch.allclose(singular, full_singular[:12], atol=1e-4)
    assert ops.product_norm(left, right) == pytest.approx(float((left @ right).norm()), rel=1e-5)


def test_fusion_reproduces_each_subject_on_its_own_inputs():
    """Two subjects whose inputs live in disjoint subspaces: fusion gives each its own delta there exactly
    (up to the ridge term), where the plain sum adds the other's delta."""
    generator = torch.Generator().manual_seed(3)
    d_a, d_b = torch.randn(8, 10, generator=generator), torch.randn(8, 10, generator=generator)
    x_a = torch.zeros(10, 50)
    x_a[:5] = torch.randn(5, 50, generator=generator)
    x_b = torch.zeros(10, 50)
    x_b[5:] = torch.randn(5, 50, generator=generator)
    fused = ops.fusion_delta([d_a, d_b], [x_a @ x_a.T, x_b @ x_b.T], regularization=1e-6)
    for delta, x in ((d_a, x_a), (d_b, x_b)):
        assert float((fused @ x - delta @ x).norm()) < 1e-3 * float((delta @ x).norm())
        assert float(((d_a + d_b) @ x - delta @ x).norm()) > 0.5 * float((delta @ x).norm())
