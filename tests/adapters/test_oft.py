"""OFT / BOFT: orthogonal blocks, LyCORIS's diag-oft/boft math (output side), peft's OFT/BOFT (input side):
same outputs and the same gradients of one training step, and peft files stock peft loads."""

from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch
from torch import nn

from personalize import adapters
from personalize.adapters.oft import cayley
from personalize.errors import UserError
from personalize.formats import peft as peft_format
from personalize.formats import save_adapter
from personalize.models.tiny_layers import Holder

peft = pytest.importorskip("peft")
logging.getLogger("lycoris").setLevel(logging.ERROR)


def _ours(base: nn.Module, method: str, **hyper) -> tuple[Holder, nn.Module]:
    model = Holder(copy.deepcopy(base))
    adapters.inject(model, method, targets="layer", name="a", **hyper)
    adapter = model.block.layer.adapters["a"]
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        adapter.oft_blocks.copy_(torch.randn(adapter.oft_blocks.shape, generator=generator) * 0.2)
        if "rescale" in adapter._parameters:
            adapter.rescale.copy_(1 + 0.1 * torch.randn(adapter.rescale.shape, generator=generator))
    return model, adapter


def test_cayley_blocks_are_orthogonal_and_zero_is_identity():
    blocks = torch.randn(3, 8, 8)
    r = cayley(blocks)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(8).expand(3, 8, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(cayley(torch.zeros(2, 4, 4)), torch.eye(4).expand(2, 4, 4))


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_merge_unmerge_and_scale(method, on_input, kind):
    torch.manual_seed(0)
    base = nn.Linear(32, 16) if kind == "linear" else nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 5, 32) if kind == "linear" else torch.randn(2, 16, 5, 5)
    model, _ = _ours(base, method, block_size=8, on_input=on_input, rescaled=method == "boft")
    with torch.no_grad():
        before, y = base(x), model(x)
        assert not torch.allclose(before, y, atol=1e-3)
        adapters.merge(model, "a")
        torch.testing.assert_close(model(x), y, atol=2e-5, rtol=1e-5)
        adapters.unmerge(model, "a")
        torch.testing.assert_close(model.block.layer.base_layer(x), before, atol=2e-5, rtol=1e-5)
        adapters.set_scale(model, "a", 0.0)
        torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("method", ["oft", "boft"])
@pytest.mark.parametrize("constraint", [0.0, 1e-3])
def test_output_side_equals_lycoris(method, constraint):
    """Our delta weight is LyCORIS's diag_oft/boft diff_weight (its constraint is alpha * out_dim)."""
    functional = pytest.importorskip(f"lycoris.functional.{'diag_oft' if method == 'oft' else 'boft'}")
    for base in (nn.Linear(16, 32), nn.Conv2d(8, 32, 3, padding=1)):
        _, adapter = _ours(base, method, block_size=8, rescaled=True, constraint=constraint, on_input=False)
        weight = base.weight.detach()
        expected = functional.diff_weight(
            weight, adapter.oft_blocks.detach(), adapter.rescale.detach(), constraint=constraint * 32
        )
        torch.testing.assert_close(adapter.delta_weight(weight), expected, atol=1e-6, rtol=1e-5)


def _peft_pair(method: str, base: nn.Module):
    if method == "oft":
        ours, adapter = _ours(base, "oft", block_size=4, on_input=True)
        config = peft.OFTConfig(r=0, oft_block_size=4, target_modules=["layer"], use_cayley_neumann=False)
    else:
        ours, adapter = _ours(base, "boft", block_size=4, stages=1, on_input=True)
        config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["layer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's BOFT tries to build its CUDA kernel and says so
        theirs = peft.get_peft_model(Holder(copy.deepcopy(base)), config)
    state = adapters.state_dict(ours, "a")
    tensors, _ = peft_format.to_peft({k.removeprefix("block."): v for k, v in state.items()})
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            name = key.removeprefix(peft_format.PREFIX)
            (match,) = [p for n, p in params.items() if n.replace(".default", "").endswith(name)]
            match.copy_(value.reshape(match.shape))
    return ours, adapter, theirs


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_one_training_step_matches_peft(method):
    """Same outputs and gradients as peft's OFT (exact Cayley) / BOFT (one butterfly factor, as on CPU)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x, target = torch.randn(3, 7, 16), torch.randn(3, 7, 12)
    ours, adapter, theirs = _peft_pair(method, base)
    loss_ours = torch.nn.functional.mse_loss(ours(x), target)
    loss_theirs = torch.nn.functional.mse_loss(theirs(x), target)
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-6, rtol=1e-5)
    loss_ours.backward()
    loss_theirs.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grad = adapter.oft_blocks.grad
    if method == "oft":
        # peft trains the upper triangle u of its Q = -Q_ours; A - A^T = Q_ours: dL/du = -(dL/dA)_upper
        rows, cols = torch.triu_indices(4, 4, 1)
        (theirs_grad,) = [g for n, g in grads.items() if n.endswith("oft_R.weight")]
        torch.testing.assert_close(ours_grad[:, rows, cols], -theirs_grad, atol=1e-6, rtol=1e-4)
    else:
        # peft trains A_p with Q = (A_p - A_p^T) / 2 in its channel order: dL/dA = 2 dL/dA_p, reordered
        order = peft_format._peft_order(4)
        (theirs_grad,) = [g for n, g in grads.items() if n.endswith("boft_R")]
        (scale_grad,) = [g for n, g in grads.items() if n.endswith("boft_s")]
        reordered = theirs_grad[..., order, :][..., :, order]
        torch.testing.assert_close(ours_grad, 2 * reordered, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(adapter.rescale.grad, scale_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["oft", "boft"])
def test_peft_files_load_in_stock_peft_with_identical_logits(method, tmp_path):
    """tiny-llama: our OFT/BOFT (input side there, as peft's) saved in peft's layout; stock peft's logits match."""
    from personalize.formats import read_adapter
    from personalize.models import build_tiny

    base, _ = build_tiny("tiny-llama")
    ours = copy.deepcopy(base)
    hyper = {"block_size": 8, **({"stages": 1} if method == "boft" else {})}
    adapters.inject(ours, method, targets="attention", name="a", **hyper)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    state = adapters.state_dict(ours, "a")
    assert all(bool(v) for k, v in state.items() if k.endswith("on_input"))
    save_adapter(tmp_path, {"model": state}, method=method, family="llm", hyper=hyper, model=ours)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        expected = ours(ids).logits
        assert not torch.allclose(expected, base(ids).logits, atol=1e-4)
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    fresh = copy.deepcopy(base)  # and back: the peft folder read onto a fresh model
    read_adapter(tmp_path, fresh).apply(fresh, name="b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_formats_refuse_what_the_other_side_cannot_read(tmp_path):
    ours, _ = _ours(nn.Linear(16, 16), "oft", block_size=4, on_input=False)
    state = {k.removeprefix("block."): v for k, v in adapters.state_dict(ours, "a").items()}
    with pytest.raises(UserError, match="no peft equivalent"):
        save_adapter(tmp_path, {"model": state}, method="oft", family="llm", hyper={})
    inputs, _ = _ours(nn.Linear(16, 16), "oft", block_size=4, on_input=True)
    state = {k.removeprefix("block."): v for k, v in adapters.state_dict(inputs, "a").items()}
    with pytest.raises(UserError, match="no kohya/LyCORIS layout"):
        save_adapter(tmp_path, {"unet": state}, method="oft", family="sd1", hyper={})
    with pytest.raises(UserError, match="Cayley-Neumann"):
        peft_format.from_peft({}, {"peft_type": "OFT"})
    with pytest.raises(UserError, match="stages must be"):
        adapters.inject(Holder(nn.Linear(16, 16)), "boft", targets="layer", block_size=4, stages=9)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.6])
@pytest.mark.parametrize(("method", "on_input"), [("oft", True), ("oft", False), ("boft", False), ("boft", True)])
def test_the_merged_weight_path_equals_rotating_the_activations(method, on_input, scale, bias):
    """With more tokens than channels the layer runs OFT/BOFT through the merged weight (MergedRotation;
    peft's BOFT, which also scales the output by boft_s, through diag(s) W M); output, input gradient and
    block gradient equal those of rotating the activations."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=bias).requires_grad_(False)  # in != out: transposes would show
    holder = nn.Sequential(base)
    adapters.inject(holder, method, targets="0", name="a", block_size=16, on_input=on_input, scale=scale)
    module = holder[0].adapters["a"]
    with torch.no_grad():
        module.oft_blocks.normal_(0, 0.2)
        if "rescale" in module._parameters:  # peft's BOFT form trains a per-output scale too
            module.rescale.uniform_(0.5, 1.5)
    x = torch.randn(2, 80, 64, requires_grad=True)  # 160 rows >= 64, 48
    grad = torch.randn(2, 80, 48)
    assert module.fused_forward(x, base, scale) is not None  # the merged path is taken here

    def run():
        for param in (x, *module.parameters()):
            param.grad = None
        y = holder(x)
        y.backward(grad)
        return y.detach(), x.grad.clone(), *(param.grad.clone() for param in module.parameters())

    fused = run()
    module.fused_forward = lambda *args: None  # the activation path
    reference = run()
    for got, want in zip(fused, reference, strict=True):  # float32 rounding, relative to the largest entry
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("on_input", [True, False])
def test_few_tokens_rotate_the_activations_in_one_product_each_way(on_input, bias):
    """Fewer tokens than channels: RowRotation (bias out and back in one batched product) equals the delta path."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=bias).requires_grad_(False)
    holder = nn.Sequential(base)
    adapters.inject(holder, "oft", targets="0", name="a", block_size=16, on_input=on_input)
    module = holder[0].adapters["a"]
    with torch.no_grad():
        module.oft_blocks.normal_(0, 0.2)
    x = torch.randn(1, 8, 64, requires_grad=True)  # 8 rows < 48
    grad = torch.randn(1, 8, 48)
    results = []
    for fused in (True, False):
        if not fused:
            module.fused_forward = lambda *args: None
        x.grad, module.oft_blocks.grad = None, None
        y = holder(x)
        y.backward(grad)
        results.append((y.detach(), x.grad.clone(), module.oft_blocks.grad.clone()))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())


def test_the_fused_paths_are_skipped_where_they_do_not_apply():
    base = nn.Linear(64, 48).requires_grad_(False)
    holder = nn.Sequential(base)
    adapters.inject(holder, "oft", targets="0", name="a", block_size=16, on_input=True)
    module = holder[0].adapters["a"]
    assert module.fused_forward(torch.randn(1, 80, 64).double(), base, 1.0) is None  # another dtype
    conv = nn.Sequential(nn.Conv2d(64, 48, 1).requires_grad_(False))
    adapters.inject(conv, "oft", targets="0", name="a", block_size=16)
    assert conv[0].adapters["a"].fused_forward(torch.randn(1, 64, 9, 9), conv[0].base_layer, 1.0) is None
