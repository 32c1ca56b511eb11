"""A convolution with a frozen weight whose backward keeps no input: y = conv2d(x, W) + b.

Autograd's convolution saves its input even when the weight needs no gradient, but the input gradient
dL/dx = conv_transpose(dL/dy, W) needs only W and the *shape* of x. The layer hands over its weight
through `frozen_weight(dtype)` in forward and again in backward, so a 4-bit layer (quant_conv.py) can
dequantize it twice instead of keeping the full-precision copy alive between the two, and a plain
frozen Conv2d (trainers/common/step_memory.py) keeps neither that copy nor the input.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class FrozenWeightConv(Protocol):
    stride: Any
    padding: Any
    dilation: Any
    groups: int
    bias: torch.Tensor | None

    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor: ...  # (out, in / groups, kh, kw)


def plain_conv(module: nn.Module) -> bool:
    """A plain zero-padded Conv2d with numeric padding (conv2d_input needs numbers): what frozen_conv2d
    reproduces, so what quantize(convs=True) and the trainers' lean frozen convs replace."""
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.weight.dtype.is_floating_point
    )


class _InputGradOnlyConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: FrozenWeightConv) -> torch.Tensor:
        ctx.layer, ctx.input_shape, ctx.input_dtype = layer, x.shape, x.dtype  # not the tensor itself
        weight = layer.frozen_weight(x.dtype)
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        grad_x = torch.nn.grad.conv2d_input(
            ctx.input_shape,
            layer.frozen_weight(grad_out.dtype),
            grad_out,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )  # (B, C_in, H, W)
        return grad_x.to(ctx.input_dtype), None


def frozen_conv2d(x: torch.Tensor, layer: FrozenWeightConv) -> torch.Tensor:
    """x (B, C_in, H, W) -> (B, C_out, H', W') through `layer`'s frozen weight and bias."""
    y = _InputGradOnlyConv.apply(x, layer)  # (B, C_out, H', W')
    return y if layer.bias is None else y + layer.bias.to(y.dtype).view(1, -1, 1, 1)
