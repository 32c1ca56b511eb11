"""IA3 (arXiv 2205.05638): learned vectors that rescale activations.

    output side (keys, values, most layers):  y = (1 + s*w) * (W x) + b      w: (out,)
    input side (feed-forward down-projection): y = W ((1 + s*w) * x) + b     w: (in,)

The parameter `weight` is the offset from 1 (starts at 0, so the model is unchanged at step 0, and
scale 0 is the base); `on_input` is a buffer saying which side, as in LyCORIS files.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, layer_kind
from personalize.adapters.lora import output_channels_view
from personalize.errors import UserError


class IA3(AdapterModule):
    method = "ia3"

    def __init__(self, base_layer: nn.Module, on_input: bool = False) -> None:
        super().__init__()
        self.kind = layer_kind(base_layer)
        if self.kind == "embedding":
            raise UserError("ia3 wraps Linear and Conv2d layers, not Embedding")
        if self.kind == "linear":
            size = base_layer.in_features if on_input else base_layer.out_features
        else:
            size = base_layer.in_channels if on_input else base_layer.out_channels
        self.weight = nn.Parameter(torch.zeros(size, device=base_layer.weight.device))
        self.register_buffer("on_input", torch.tensor(bool(on_input)))
        self.acts_on_input = bool(on_input)  # type: ignore[misc]
        self._register_load_state_dict_pre_hook(self._refresh_side)

    def _refresh_side(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix + "on_input" in state_dict:
            self.acts_on_input = bool(state_dict[prefix + "on_input"])  # type: ignore[misc]

    def scale_input(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        factor = output_channels_view(1 + scale * self.weight, x)  # (in,) or (1, in, 1, 1)
        return (x * factor).to(x.dtype)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        bias = base_layer.bias
        base_no_bias = base_out if bias is None else base_out - output_channels_view(bias, base_out)
        return output_channels_view(scale * self.weight, base_out) * base_no_bias

    def _factor(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        vector = 1 + scale * self.weight.to(weight.dtype)
        shape = [1] * weight.dim()
        shape[1 if self.acts_on_input else 0] = -1
        return vector.reshape(shape)

    def merged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight * self._factor(weight, scale)

    def unmerged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight / self._factor(weight, scale)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.merged(base_weight, 1.0) - base_weight

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"on_input": bool(tensors.get("on_input", torch.tensor(False)))}
