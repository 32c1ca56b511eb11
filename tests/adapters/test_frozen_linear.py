"""Frozen Linear layers without a kept input, with an fp32 input gradient on CPUs lacking native bf16."""

import pytest
import torch
from torch import nn

from personalize import adapters
from personalize.adapters import frozen_linear
from personalize.adapters.frozen_linear import lean_frozen_linears
from personalize.models import build_tiny


def _lora_model(mode: str) -> tuple[nn.Module, dict]:
    model, tokenizer = build_tiny("tiny-llama")
    model.requires_grad_(False)
    if mode != "fp32":
        model.to(torch.bfloat16)
    if mode == "nf4":
        pytest.importorskip("bitsandbytes")
        adapters.quantize(model, "nf4", skip=("lm_head",), compute_dtype=torch.bfloat16)
    adapters.inject(model, "lora", targets="all-linear", rank=4, alpha=8)
    generator = torch.Generator().manual_seed(0)
    for param in adapters.trainable_parameters(model):
        param.data = torch.randn(param.shape, generator=generator) * 0.1  # fp32, as the trainer keeps them
    return model.train(), dict(tokenizer(["what is two", "red is a color"], return_tensors="pt", padding=True))


def _loss_and_grads(model: nn.Module, inputs: dict, lean: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    with lean_frozen_linears(model, lean) as count:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    assert count == (43 if lean else 0)  # 7 per layer x 2 layers x 3 (LoRA A, B, base) + lm_head
    return loss.detach(), [param.grad.clone() for param in adapters.trainable_parameters(model)]


@pytest.mark.parametrize(("mode", "force_fp32_grad"), [("fp32", False), ("bf16", True), ("nf4", True), ("nf4", False)])
def test_loss_and_adapter_gradients_equal_the_plain_layers(mode, force_fp32_grad, monkeypatch):
    """The forward is the layer's own arithmetic; the input gradient is the same product (in fp32 where
    the CPU's half-precision GEMM is slow: forced here either way, so both paths run on any CPU)."""
    monkeypatch.setattr(frozen_linear, "slow_half_gemm", lambda: force_fp32_grad)
    monkeypatch.setattr(frozen_linear, "FP32_BLOCK", 100)  # several row blocks even at tiny sizes
    model, inputs = _lora_model(mode)
    loss, grads = _loss_and_grads(model, inputs, lean=False)
    lean_loss, lean_grads = _loss_and_grads(model, inputs, lean=True)
    assert torch.equal(lean_loss, loss)
    exact = mode == "fp32" or not force_fp32_grad
    for plain, lean in zip(grads, lean_grads):
        scale = plain.abs().max()
        assert scale > 0
        torch.testing.assert_close(lean, plain, atol=0 if exact else 2e-2 * float(scale), rtol=0 if exact else 2e-2)


def test_only_frozen_layers_change_path_and_everything_is_restored():
    layer = nn.Linear(8, 4)
    trained = nn.Linear(4, 2)
    layer.requires_grad_(False)
    model = nn.Sequential(layer, nn.ReLU(), trained)
    x = torch.randn(3, 8, requires_grad=True)
    with lean_frozen_linears(model) as count:
        assert count == 2 and "forward" in layer.__dict__
        model(x).sum().backward()
    assert trained.weight.grad is not None and layer.weight.grad is None  # a trained layer keeps autograd's path
    assert "forward" not in layer.__dict__ and type(layer) is nn.Linear
    expected = torch.autograd.grad(model(x).sum(), x)[0]
    x.grad = None
    with lean_frozen_linears(model):
        torch.testing.assert_close(torch.autograd.grad(model(x).sum(), x)[0], expected)
