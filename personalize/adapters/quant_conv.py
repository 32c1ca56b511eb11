"""A 4-bit Conv2d: the weight flattened to (out, in * kh * kw) and stored as bitsandbytes NF4/FP4 blocks.

bitsandbytes quantizes Linear layers only, but 70% of an SD1.x UNet's weights are convolutions (the
ResNet 3x3 convs and the 1x1 proj_in/proj_out), so a Linear-only 4-bit UNet keeps most of its
memory. Here the frozen conv weight is dequantized on the fly: y = conv2d(x, dequant(Wq)) + b.

The backward pass dequantizes again instead of keeping the full-precision weight of every layer alive
between forward and backward (that would bring back the memory quantization saved); only the input
gradient is computed -- the base is frozen, adapters train beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from personalize.adapters.frozen_conv import frozen_conv2d


class Conv2d4bit(nn.Conv2d):
    """A frozen Conv2d whose weight is a bitsandbytes Params4bit of the flattened kernel."""

    def __init__(
        self, conv: nn.Conv2d, mode: str, weight: torch.Tensor | None = None, device: torch.device | str = "cpu"
    ) -> None:
        import bitsandbytes as bnb

        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",
        )
        full = (conv.weight if weight is None else weight).detach().to("cpu")
        full = full if full.dtype in (torch.float16, torch.bfloat16) else full.float()  # dequantizes to this dtype
        self.weight_shape = tuple(full.shape)  # (out, in / groups, kh, kw)
        self.weight = bnb.nn.Params4bit(full.reshape(full.shape[0], -1), requires_grad=False, quant_type=mode)
        self.weight = self.weight.to(device)  # bitsandbytes quantizes on the way to the device
        if conv.bias is not None:
            self.bias = nn.Parameter(conv.bias.detach().to(device, copy=True), requires_grad=False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        flat = dequantize_4bit(self.weight.data, self.weight.quant_state)  # (out, in * kh * kw)
        return flat.to(dtype).view(self.weight_shape)

    frozen_weight = dequantized  # what frozen_conv2d rebuilds in forward and again in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_conv2d(x, self)  # (B, out, H', W')
