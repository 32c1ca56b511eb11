"""Given identical factors, our adapters equal the reference implementations (peft, LyCORIS).

Conventions that differ (see the issue note): peft's LoKr always scales by alpha/r, LyCORIS and ComfyUI
use 1 when both Kronecker factors are full -- we follow LyCORIS; the low-rank cases below agree with all.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from personalize import adapters
from personalize.models.tiny_layers import Holder, randomize

peft = pytest.importorskip("peft")
logging.getLogger("lycoris").setLevel(logging.ERROR)


def _pair(base: nn.Module, method: str, **hyper):
    ours = Holder(base)
    theirs = Holder(type(base).__new__(type(base)))
    theirs.block.layer = __import__("copy").deepcopy(base)
    adapters.inject(ours, method, targets="layer", name="a", **hyper)
    randomize(ours.block.layer.adapters["a"])
    return ours, theirs


def _peft_model(theirs: Holder, config):
    return peft.get_peft_model(theirs, config)


def _copy(peft_model, mapping: dict[str, torch.Tensor]) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for suffix, value in mapping.items():
            (match,) = [p for n, p in params.items() if n.endswith(suffix)]
            match.copy_(value.reshape(match.shape))


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lora_and_dora_equal_peft(kind, dora):
    torch.manual_seed(0)
    base = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 5, 16) if kind == "linear" else torch.randn(2, 8, 6, 6)
    ours, theirs = _pair(base, "dora" if dora else "lora", rank=4, alpha=2)
    config = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["layer"], use_dora=dora, init_lora_weights=False)
    model = _peft_model(theirs, config)
    adapter = ours.block.layer.adapters["a"]
    mapping = {"lora_A.default.weight": adapter.lora_down.weight, "lora_B.default.weight": adapter.lora_up.weight}
    if dora:
        mapping["lora_magnitude_vector.default.weight"] = adapter.dora_scale
    _copy(model, mapping)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        adapters.merge(ours, "a")
        torch.testing.assert_close(ours.block.layer.base_layer.weight, merged.block.layer.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_loha_equals_peft_and_lycoris(kind):
    from lycoris.functional import loha as lycoris_loha

    torch.manual_seed(0)
    base = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 5, 16) if kind == "linear" else torch.randn(2, 8, 6, 6)
    ours, theirs = _pair(base, "loha", rank=4, alpha=2)
    adapter = ours.block.layer.adapters["a"]
    model = _peft_model(theirs, peft.LoHaConfig(r=4, alpha=2, target_modules=["layer"], use_effective_conv2d=False))
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    _copy(model, {f"{n}.default": getattr(adapter, n) for n in names})
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)
        reference = lycoris_loha.diff_weight(
            adapter.hada_w1_b, adapter.hada_w1_a, adapter.hada_w2_b, adapter.hada_w2_a, None, None, gamma=0.5
        )
        torch.testing.assert_close(adapter.delta_weight(base.weight), reference.reshape(base.weight.shape))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lokr_equals_peft_and_lycoris(kind):
    from lycoris.functional import lokr as lycoris_lokr

    torch.manual_seed(0)
    base = nn.Linear(64, 96) if kind == "linear" else nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 5, 64) if kind == "linear" else torch.randn(2, 16, 6, 6)
    ours, theirs = _pair(base, "lokr", rank=2, alpha=1, factor=4)  # w2 low-rank: every tool scales alpha/r
    adapter = ours.block.layer.adapters["a"]
    assert adapter.plan.w2_rank == 2
    model = _peft_model(
        theirs, peft.LoKrConfig(r=2, alpha=1, decompose_factor=4, target_modules=["layer"], use_effective_conv2d=False)
    )
    _copy(model, {f"{n}.default": getattr(adapter, n) for n in ("lokr_w1", "lokr_w2_a", "lokr_w2_b")})
    with torch.no_grad():
        torch.testing.assert_close(ours(x), model(x), rtol=1e-4, atol=1e-5)
        w2_b = adapter.lokr_w2_b.reshape(2, adapter.plan.n, *adapter.plan.kernel)
        reference = lycoris_lokr.diff_weight(
            adapter.lokr_w1, None, None, None, adapter.lokr_w2_a, w2_b, None, gamma=1.0
        )
        torch.testing.assert_close(adapter.delta_weight(base.weight), reference.reshape(base.weight.shape))


def test_lokr_tucker_equals_lycoris():
    """A conv's low-rank w2 through a Tucker core: t2 (r, r, kh, kw) x w2_a (r, k) x w2_b (r, n)."""
    from lycoris.functional.general import rebuild_tucker
    from lycoris.functional.lokr import make_kron

    torch.manual_seed(0)
    base = nn.Conv2d(16, 32, 3, padding=1)
    ours, _ = _pair(base, "lokr", rank=2, alpha=1, factor=4, tucker=True)
    adapter = ours.block.layer.adapters["a"]
    assert adapter.plan.tucker and adapter.lokr_t2.shape == (2, 2, 3, 3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
        # LokrModule's scale alpha / r (functional.diff_weight would read r off w2_a, which is (r, k) here)
        w2 = rebuild_tucker(adapter.lokr_t2, adapter.lokr_w2_a, adapter.lokr_w2_b)
        reference = make_kron(adapter.lokr_w1, w2, 1 / 2)
        torch.testing.assert_close(adapter.delta_weight(base.weight), reference.reshape(base.weight.shape))
        x = torch.randn(2, 16, 6, 6)
        merged = nn.functional.conv2d(x, base.weight + adapter.delta_weight(base.weight), base.bias, padding=1)
        torch.testing.assert_close(ours(x), merged, rtol=1e-4, atol=1e-4)


def test_kron_factored_forward_equals_torch_kron():
    from personalize.adapters.lokr import kron_conv2d, kron_linear, kron_linear_low_rank

    torch.manual_seed(0)
    for w1, w2 in ((torch.randn(3, 4), torch.randn(5, 6)), (torch.randn(6, 2), torch.randn(3, 5))):  # both orders
        x = torch.randn(7, w1.shape[1] * w2.shape[1])
        torch.testing.assert_close(kron_linear(x, w1, w2), x @ torch.kron(w1, w2).T, rtol=1e-5, atol=1e-5)
    w1, w2_a, w2_b = torch.randn(3, 4), torch.randn(5, 2), torch.randn(2, 6)
    x = torch.randn(2, 7, 24)
    expected = x @ torch.kron(w1, w2_a @ w2_b).T
    torch.testing.assert_close(kron_linear_low_rank(x, w1, w2_a, w2_b), expected, rtol=1e-5, atol=1e-5)
    w1, w2c = torch.randn(3, 4), torch.randn(5, 6, 3, 3)
    xc = torch.randn(2, 24, 8, 8)
    full = torch.kron(w1[:, :, None, None], w2c)
    expected = nn.functional.conv2d(xc, full, padding=1)
    torch.testing.assert_close(kron_conv2d(xc, w1, w2c, {"padding": 1}), expected, rtol=1e-4, atol=1e-4)


def test_krona_layout_sizes_and_scale():
    layer = Holder(nn.Linear(320, 320))
    adapters.inject(layer, "krona", targets="layer", name="k", a1=64, a2=8)
    adapter = layer.block.layer.adapters["k"]
    assert adapter.lokr_w1.shape == (64, 8) and adapter.lokr_w2.shape == (5, 40)
    assert adapter.scaling == 1.0 and torch.count_nonzero(adapter.lokr_w2) == 0
    assert set(adapters.state_dict(layer, "k")) == {"block.layer.lokr_w1", "block.layer.lokr_w2", "block.layer.alpha"}
