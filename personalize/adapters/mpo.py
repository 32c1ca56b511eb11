"""MPO fine-tuning (Liu et al., ACL 2021, arXiv 2106.02205): train the auxiliary tensors of a matrix
product operator decomposition of W, keep its central tensor frozen.

With out = o1 o2 o3 and in = i1 i2 i3, W (out, in) is read as W[o1 o2 o3, i1 i2 i3] and split by two
SVDs (TT-SVD, full bond dimensions, so the decomposition is exact):

    W[o1 o2 o3, i1 i2 i3] = sum_{a, b} T1[(o1 i1), a] C[a, (o2 i2), b] T3[b, (o3 i3)]

T1 (o1 i1, d1) and T3 (d2, o3 i3) are the small auxiliary tensors ("mpo_left", "mpo_right", trained),
C (d1, o2 i2, d2) the central tensor holding almost all of W (frozen). The adapter adds

    dW = MPO(T1, C, T3) - MPO(T1_0, C, T3_0)       (zero at step 0)

T1_0, T3_0 (the decomposition's own factors, orthonormal) are kept as buffers, so C is recomputed from
the base weight by projection, C = T1_0^T W T3_0^T, when an adapter is loaded (no SVD sign ambiguity,
and C is never stored). Cost: C is a frozen copy the size of W per wrapped layer (the paper replaces W
by its MPO; here the base stays untouched), and dW is formed in every forward pass. `factor` bounds the
outer factors o1, o3, i1, i3 (each the largest divisor <= min(factor, cube root of the dimension)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, check_positive, layer_kind
from personalize.adapters.quant import dequantized_weight
from personalize.errors import UserError


def outer_factors(dimension: int, factor: int) -> tuple[int, int, int]:
    """(a, dimension / a^2, a): the largest a <= min(factor, dimension^(1/3)) with a^2 | dimension."""
    best = 1
    for a in range(2, factor + 1):
        if a**3 > dimension:
            break
        if dimension % (a * a) == 0:
            best = a
    return best, dimension // (best * best), best


def _grouped(weight: torch.Tensor, outs: tuple[int, int, int], ins: tuple[int, int, int]) -> torch.Tensor:
    """W (out, in) -> (o1 i1, o2 i2, o3 i3)."""
    (o1, o2, o3), (i1, i2, i3) = outs, ins
    six = weight.reshape(o1, o2, o3, i1, i2, i3).permute(0, 3, 1, 4, 2, 5)  # (o1, i1, o2, i2, o3, i3)
    return six.reshape(o1 * i1, o2 * i2, o3 * i3)


def _ungrouped(grouped: torch.Tensor, outs: tuple[int, int, int], ins: tuple[int, int, int]) -> torch.Tensor:
    """(o1 i1, o2 i2, o3 i3) -> W (out, in)."""
    (o1, o2, o3), (i1, i2, i3) = outs, ins
    six = grouped.reshape(o1, i1, o2, i2, o3, i3).permute(0, 2, 4, 1, 3, 5)  # (o1, o2, o3, i1, i2, i3)
    return six.reshape(o1 * o2 * o3, i1 * i2 * i3)


def decompose(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TT-SVD of (L, M, R) into T1 (L, d1), C (d1, M, d2), T3 (d2, R), exact."""
    left, middle, right = grouped.shape
    u, s, vh = torch.linalg.svd(grouped.reshape(left, middle * right), full_matrices=False)  # u (L, d1)
    rest = (s[:, None] * vh).reshape(-1, right)  # (d1 M, R)
    u2, s2, vh2 = torch.linalg.svd(rest, full_matrices=False)  # vh2 (d2, R)
    central = (u2 * s2).reshape(u.shape[1], middle, vh2.shape[0])  # (d1, M, d2)
    return u, central, vh2


def contract(left: torch.Tensor, central: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """T1 (L, d1), C (d1, M, d2), T3 (d2, R) -> (L, M, R)."""
    return torch.einsum("la,amb,br->lmr", left, central, right)


def project(grouped: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """C = T1^T W T3^T for orthonormal T1 columns / T3 rows: (L, M, R) -> (d1, M, d2)."""
    return torch.einsum("la,lmr,br->amb", left, grouped, right)


class MPO(AdapterModule):
    method = "mpo"

    def __init__(self, base_layer: nn.Module, factor: int = 16) -> None:
        super().__init__()
        check_positive("mpo", factor=factor)
        if layer_kind(base_layer) != "linear":
            raise UserError(f"mpo wraps Linear layers, not {type(base_layer).__name__}")
        self.outs = outer_factors(base_layer.out_features, factor)
        self.ins = outer_factors(base_layer.in_features, factor)
        grouped = _grouped(dequantized_weight(base_layer).detach().float(), self.outs, self.ins)
        if grouped.shape[0] > grouped.shape[1] * grouped.shape[2] or grouped.shape[2] > grouped.shape[1]:
            raise UserError(f"mpo: a {tuple(base_layer.weight.shape)} weight has no factors that keep C the largest")
        left, central, right = decompose(grouped)
        self.mpo_left = nn.Parameter(left.clone())  # T1 (o1 i1, d1)
        self.mpo_right = nn.Parameter(right.clone())  # T3 (d2, o3 i3)
        self.register_buffer("mpo_left_init", left.clone())
        self.register_buffer("mpo_right_init", right.clone())
        self.register_buffer("central", central, persistent=False)  # C (d1, o2 i2, d2), frozen
        self.__dict__["base"] = base_layer  # not a submodule: read again when an adapter is loaded
        self.register_load_state_dict_post_hook(self._recompute_central)

    @staticmethod
    def _recompute_central(module: nn.Module, _: Any) -> None:
        grouped = _grouped(dequantized_weight(module.base).detach().float(), module.outs, module.ins)
        module.central = project(grouped, module.mpo_left_init, module.mpo_right_init)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        trained = contract(self.mpo_left, self.central, self.mpo_right)  # (L, M, R)
        initial = contract(self.mpo_left_init, self.central, self.mpo_right_init)
        return _ungrouped(trained - initial, self.outs, self.ins)  # (out, in)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        return (x.to(self.mpo_left.dtype) @ self.delta_weight().T) * scale  # (..., out)
