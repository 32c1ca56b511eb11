"""Frozen Linear layers whose backward keeps no input and runs its GEMM where a CPU is fast: y = x W^T + b.

The input gradient dL/dx = dL/dy W needs W only, not x, so nothing of the layer's input is kept for
backward; a 4-bit layer dequantizes W again in backward instead of keeping the copy between the two
(as bitsandbytes' own MatMul4Bit does). On a CPU without native bf16/fp16 matrix instructions (AVX2:
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is False) PyTorch's half-precision GEMM is fast for
the forward's x W^T but many times slower for the backward's dL/dy W (measured on the 2-core dev
machine, (32 x 4096) @ (4096 x 1536) in bf16: 657 ms CPU, against 43 ms for the same product in fp32
with both casts); there the input gradient is computed in fp32 and cast back, which is also the more
accurate product. The forward is the layer's own arithmetic (bitsandbytes: dequantize to the compute
dtype, then F.linear), so outputs are unchanged.

    with lean_frozen_linears(model):   # the LLM recipe's training loop on a CPU
        loss = model(**batch).loss; loss.backward()
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters.quant import _unpack_cpu_format, quant_mode

HALF = (torch.bfloat16, torch.float16)
FP32_BLOCK = 2**22  # elements of W upcast at a time in the fp32 input gradient


@cache
def slow_half_gemm() -> bool:
    """True on a CPU whose oneDNN has no native bf16 (then fp16 is emulated too)."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def frozen_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight (out, in) in `dtype`; a 4-bit layer's dequantized (a new tensor each call)."""
    if quant_mode(layer) == "4bit":
        from bitsandbytes.functional import dequantize_4bit

        _unpack_cpu_format(layer.weight)  # an eval-mode forward may have repacked it for bnb's CPU kernel
        return dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    return layer.weight.to(dtype)


def _compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    if quant_mode(layer) == "4bit":  # bitsandbytes computes in its compute dtype (set when quantizing)
        return getattr(layer, "compute_dtype", None) or x.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return layer.weight.dtype


class _InputGradOnlyLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        dtype = _compute_dtype(layer, x)
        ctx.layer, ctx.input_dtype, ctx.dtype = layer, x.dtype, dtype  # not the input itself
        bias = None if layer.bias is None else layer.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), frozen_weight(layer, dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = frozen_weight(ctx.layer, ctx.dtype)  # (out, in)
        if not (grad_out.device.type == "cpu" and ctx.dtype in HALF and slow_half_gemm()):
            return (grad_out.to(ctx.dtype) @ weight).to(ctx.input_dtype), None
        return _fp32_input_grad(grad_out, weight).to(ctx.input_dtype), None


def _fp32_input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dL/dy W in fp32, over blocks of W's rows so that the fp32 copies stay ~16 MB (an lm_head is 100s of MB)."""
    flat = grad_out.reshape(-1, weight.shape[0])  # (N, out)
    grad_x = torch.zeros(flat.shape[0], weight.shape[1], dtype=torch.float32, device=flat.device)  # (N, in)
    rows = max(1, FP32_BLOCK // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        grad_x.addmm_(flat[:, start : start + rows].float(), weight[start : start + rows].float())
    return grad_x.view(*grad_out.shape[:-1], weight.shape[1])  # (..., in)


def frozen_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """x (..., in) -> (..., out) through `layer`'s frozen weight and bias (a Linear or a bnb Linear4bit)."""
    y = _InputGradOnlyLinear.apply(x, layer)
    return y if quant_mode(layer) != "4bit" else y.to(x.dtype)  # bitsandbytes returns the input's dtype


def _lean_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    trains = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
    if trains or not (torch.is_grad_enabled() and x.requires_grad):
        return type(self).forward(self, x)
    return frozen_linear(x, self)


def _swappable(module: nn.Module) -> bool:
    return type(module) is nn.Linear or type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


@contextlib.contextmanager
def lean_frozen_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the Linear and 4-bit Linear layers of `model` take frozen_linear while their
    weight and bias are frozen (a trained one, e.g. LoRA's own, keeps its path); yields their count.
    Only each instance's `forward` is set (its class, and so quant_mode, stay), and removed on exit."""
    layers = [module for module in model.modules() if enabled and _swappable(module)]
    for layer in layers:
        layer.forward = types.MethodType(_lean_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward
