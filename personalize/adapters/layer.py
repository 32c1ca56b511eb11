"""The wrapper that puts named adapters around one frozen base layer.

    y = base_layer(x') + sum_a delta_a(x', y_base, scale_a),  x' = x after input-side adapters (IA3)

The base layer stays untouched as `base_layer` (its own state_dict keys move under that name while
wrapped); merged adapters are folded into its weight and skipped in forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from personalize.adapters.base import AdapterModule


class AdapterLayer(nn.Module):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.merged: list[str] = []

    def add(self, name: str, adapter: AdapterModule, scale: float = 1.0) -> None:
        self.adapters[name] = adapter
        self.scales[name] = scale

    def active(self) -> list[tuple[str, AdapterModule]]:
        return [
            (name, adapter)
            for name, adapter in self.adapters.items()
            if name not in self.merged and self.scales[name] != 0.0
        ]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.active()
        if len(active) == 1 and not args and not kwargs:  # one adapter may compute the whole output (OFT)
            name, adapter = active[0]
            out = adapter.fused_forward(x, self.base_layer, self.scales[name])
            if out is not None:
                return out
        for name, adapter in active:
            if adapter.acts_on_input:
                x = adapter.scale_input(x, self.scales[name])
        base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        for name, adapter in active:
            if not adapter.acts_on_input or adapter.output_delta:
                out = out + adapter.delta(x, base_out, self.base_layer, self.scales[name]).to(out.dtype)
        return out

    def __getattr__(self, name: str) -> Any:
        # Code that reads base attributes (`layer.weight`, `in_features`, diffusers' `.processor`
        # checks) keeps working on a wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, merged={self.merged}"
