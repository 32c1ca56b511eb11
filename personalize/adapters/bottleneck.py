"""Bottleneck adapters: Houlsby, Pfeiffer, Compacter, and AdapterDrop.

A serial bottleneck adapter on a sublayer's output h (the output projection of attention or the FFN,
before the residual sum):

    h' = h + s * W_up f(W_down h + b_down) + s * b_up        W_down (m, D), W_up (D, m), m = D / reduction

W_up and b_up start at zero, so the model is unchanged at step 0 (Houlsby et al. start near zero).

- Houlsby (arXiv 1902.00751): after both sublayers of every block (`o_proj` and `down_proj`).
- Pfeiffer (arXiv 2005.00247): after the feed-forward sublayer only (`down_proj`), half the parameters.
- Compacter (Karimi Mahabadi et al., arXiv 2106.04647): W_down and W_up are PHM layers,
  W = sum_{i=1..n} A_i (x) (s_i t_i^T), Kronecker products of n x n "rule" matrices A_i shared by ALL
  Compacter layers of the adapter (tied after injection) and rank-1 factors per layer.
- AdapterDrop (Rueckle et al., arXiv 2010.11918): no adapters in the lowest `drop_below` layers
  (`adapter_drop_targets`: training then stops backpropagating there), or switch the lower ones off at
  inference (`drop_lower`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters.base import AdapterModule, check_positive, layer_kind
from personalize.errors import UserError

# where each method goes in a Llama-style decoder (a VLM's language model too, not its vision tower)
PLACEMENTS = {
    "houlsby": r"(.*\.)?layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)",
    "pfeiffer": r"(.*\.)?layers\.\d+\.mlp\.down_proj",
    "compacter": r"(.*\.)?layers\.\d+\.mlp\.down_proj",
}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check(method: str, base_layer: nn.Module, activation: str) -> None:
    if layer_kind(base_layer) != "linear":
        raise UserError(f"{method} adapters go after Linear output projections, not {type(base_layer).__name__}")
    if activation not in ACTIVATIONS:
        raise UserError(f"{method}: activation must be one of {', '.join(ACTIVATIONS)} (got '{activation}')")


class Bottleneck(AdapterModule):
    method = "houlsby"

    def __init__(self, base_layer: nn.Module, reduction: int = 16, activation: str = "relu") -> None:
        super().__init__()
        check_positive("bottleneck", reduction=reduction)
        _check("bottleneck", base_layer, activation)
        dim = base_layer.out_features
        size = max(1, dim // reduction)
        device = base_layer.weight.device
        self.adapter_down = nn.Linear(dim, size, device=device)  # (m, D)
        self.adapter_up = nn.Linear(size, dim, device=device)  # (D, m)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.activation = activation

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        h = base_out.to(self.adapter_down.weight.dtype)  # (..., D)
        return scale * self.adapter_up(ACTIVATIONS[self.activation](self.adapter_down(h)))

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise UserError("a bottleneck adapter is non-linear: it cannot be merged into the weights")


class Pfeiffer(Bottleneck):
    method = "pfeiffer"


def phm_weight(rules: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """sum_i A_i (x) (s_i t_i^T): rules (n, n, n), left (n, p, 1), right (n, 1, q) -> (n p, n q)."""
    factors = left @ right  # (n, p, q): rank-1 B_i
    return torch.einsum("iab,ipq->apbq", rules, factors).reshape(rules.shape[1] * left.shape[1], -1)


class Compacter(AdapterModule):
    method = "compacter"

    def __init__(self, base_layer: nn.Module, reduction: int = 16, phm_dim: int = 4, activation: str = "gelu") -> None:
        super().__init__()
        check_positive("compacter", reduction=reduction, phm_dim=phm_dim)
        _check("compacter", base_layer, activation)
        dim = base_layer.out_features
        size = max(phm_dim, dim // reduction // phm_dim * phm_dim)
        if dim % phm_dim:
            raise UserError(f"compacter: phm_dim {phm_dim} must divide the hidden size {dim}")
        n, device = phm_dim, base_layer.weight.device
        self.phm_rule = nn.Parameter(torch.randn(n, n, n, device=device) * (1 / math.sqrt(n)))  # A (n, n, n), shared
        # down: (m, D) = sum A_i (x) (s_i t_i^T), s_i (m/n, 1), t_i (1, D/n); up: (D, m) likewise
        self.down_left = nn.Parameter(torch.randn(n, size // n, 1, device=device) * 0.02)
        self.down_right = nn.Parameter(torch.randn(n, 1, dim // n, device=device) * 0.02)
        self.up_left = nn.Parameter(torch.randn(n, dim // n, 1, device=device) * 0.02)
        self.up_right = nn.Parameter(torch.zeros(n, 1, size // n, device=device))  # W_up = 0 at step 0
        self.down_bias = nn.Parameter(torch.zeros(size, device=device))
        self.up_bias = nn.Parameter(torch.zeros(dim, device=device))
        self.activation = activation

    @staticmethod
    def after_inject(model: nn.Module, paths: Sequence[str], name: str) -> None:
        """Tie the rule matrices A_i: one tensor for every Compacter layer of the adapter, as the paper."""
        modules = [model.get_submodule(path).adapters[name] for path in paths]
        shared = modules[0].phm_rule
        for module in modules[1:]:
            module.phm_rule = shared

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        h = base_out.to(self.phm_rule.dtype)  # (..., D)
        down = phm_weight(self.phm_rule, self.down_left, self.down_right)  # (m, D)
        up = phm_weight(self.phm_rule, self.up_left, self.up_right)  # (D, m)
        hidden = ACTIVATIONS[self.activation](F.linear(h, down, self.down_bias))
        return scale * F.linear(hidden, up, self.up_bias)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise UserError("a Compacter adapter is non-linear: it cannot be merged into the weights")


def layer_index(path: str) -> int | None:
    match = LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def adapter_drop_targets(model: nn.Module, targets: str | Sequence[str], drop_below: int) -> list[str]:
    """AdapterDrop in training: the paths `targets` selects, without those in layers 0 .. drop_below - 1."""
    from personalize.adapters.targets import select

    if drop_below < 0:
        raise UserError(f"drop_below must be >= 0 (got {drop_below})")
    paths = select(model, targets)
    kept = [path for path in paths if (layer_index(path) or 0) >= drop_below]
    if not kept:
        raise UserError(f"drop_below {drop_below} drops every adapter layer (the model has {len(paths)})")
    return kept


def drop_lower(model: nn.Module, name: str, drop_below: int) -> list[str]:
    """AdapterDrop at inference: switch adapter `name` off in the layers below `drop_below` (scale 0 there);
    returns the paths switched off. `adapters.set_scale(model, name, 1)` switches them on again."""
    from personalize.adapters.inject import _layers, _require

    _require(model, name)
    dropped = []
    for path, layer in _layers(model, name):
        index = layer_index(path)
        if index is not None and index < drop_below:
            layer.scales[name] = 0.0
            dropped.append(path)
    return dropped
