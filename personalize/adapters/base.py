"""What every adapter method module provides (one level: no hierarchy beyond this class).

A method module holds its parameters under the names the kohya/LyCORIS file formats use (so that
`module.state_dict()` already has canonical keys) and answers three questions:

- `delta(x, base_out, base_layer, scale)`: what to add to the frozen layer's output (training and
  unmerged inference); most methods ignore `base_out`.
- `delta_weight(base_weight)`: dW at scale 1, shaped like the base weight (merge and export).
- `merged(weight, scale)` / `unmerged(weight, scale)`: W -> W' and back; additive by default.
Methods that act on the layer input instead (IA3 on feed-forward inputs) set `acts_on_input` and
implement `scale_input`; one that also changes the output (peft's BOFT: rotate the input, rescale the
output) sets `output_delta` too and gets `delta` called as well.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from personalize.errors import UserError


class AdapterModule(nn.Module):
    method: ClassVar[str] = ""
    acts_on_input: ClassVar[bool] = False
    output_delta: ClassVar[bool] = False

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def scale_input(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor | None:
        """The layer's whole output when this method can compute it faster than base + delta (OFT's merged
        weight); None: the layer runs the usual path. Only asked when this is the layer's one active adapter."""
        return None

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.add(weight, self.delta_weight(weight).to(weight.dtype), alpha=scale)  # W + scale dW

    def unmerged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.add(weight, self.delta_weight(weight).to(weight.dtype), alpha=-scale)  # W - scale dW


def check_positive(method: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise UserError(f"{method}: {name} must be positive (got {value})")


def layer_kind(layer: nn.Module) -> str:
    """'linear', 'conv2d' or 'embedding' (bnb Linear4bit/8bitLt subclass nn.Linear)."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv2d"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    raise UserError(f"adapters wrap nn.Linear, nn.Conv2d and nn.Embedding layers, not {type(layer).__name__}")


def base_weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """(out, in) of a Linear, (out, in / groups, kh, kw) of a Conv2d -- from the layer's geometry, since a
    quantized layer's weight tensor holds packed blocks of another shape."""
    if isinstance(layer, nn.Conv2d):
        return (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    return (layer.out_features, layer.in_features)


def conv_arguments(layer: nn.Conv2d) -> dict:
    """The geometry of a base conv, for a factor that must see the same windows."""
    if layer.groups != 1:
        raise UserError(f"grouped convolutions (groups={layer.groups}) cannot take a low-rank adapter")
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
