"""LoHa: low-rank Hadamard product (FedPara, arXiv 2108.06098; LyCORIS).

    dW = s * (w1a @ w1b) * (w2a @ w2b),   s = alpha / r

w1a/w2a ("hada_w1_a", "hada_w2_a") are (out, r), w1b/w2b are (r, in * kh * kw). With the Tucker option
on a k x k conv, each half is t (r, r, kh, kw) contracted with w_b (r, in) and w_a (r, out):
`einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`. As LyCORIS does, hada_w1_a starts at zero so
dW = 0 at step 0. The Hadamard product has no factored forward, so dW is built from the factors; for
Linear layers the fused autograd function below keeps only the factors and the input for backward and
rebuilds dW there, instead of holding an (out x in) tensor per layer between forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters.base import AdapterModule, base_weight_shape, check_positive, conv_arguments, layer_kind
from personalize.errors import UserError


def hadamard_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
    """(w1a @ w1b) * (w2a @ w2b): (out, r) x (r, in) -> (out, in)."""
    return (w1a @ w1b) * (w2a @ w2b)


def tucker_half(t: torch.Tensor, w_b: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    """t (r, r, kh, kw), w_b (r, in), w_a (r, out) -> (out, in, kh, kw)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)


class _HadamardLinear(torch.autograd.Function):
    """y = x @ (s * (w1a w1b) * (w2a w2b))^T, with dW rebuilt in backward instead of saved."""

    @staticmethod
    def forward(ctx: Any, x, w1a, w1b, w2a, w2b, scale: float):  # x (..., in)
        ctx.save_for_backward(x, w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return F.linear(x, hadamard_delta(w1a, w1b, w2a, w2b) * scale)  # (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out):  # grad_out (..., out)
        x, w1a, w1b, w2a, w2b = ctx.saved_tensors
        p1, p2 = w1a @ w1b, w2a @ w2b  # (out, in) each
        grad_x = grad_out @ (p1 * p2 * ctx.scale) if ctx.needs_input_grad[0] else None
        grad_delta = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1]) * ctx.scale  # (out, in)
        grad_p1, grad_p2 = grad_delta * p2, grad_delta * p1
        return grad_x, grad_p1 @ w1b.T, w1a.T @ grad_p1, grad_p2 @ w2b.T, w2a.T @ grad_p2, None


class LoHa(AdapterModule):
    method = "loha"

    def __init__(self, base_layer: nn.Module, rank: int = 4, alpha: float | None = None, tucker: bool = False) -> None:
        super().__init__()
        check_positive("loha", rank=rank)
        self.kind = layer_kind(base_layer)
        if self.kind == "embedding":
            raise UserError("loha wraps Linear and Conv2d layers, not Embedding")
        weight_shape = base_weight_shape(base_layer)
        out_dim, in_dim = weight_shape[0], weight_shape[1]
        kernel = tuple(weight_shape[2:])
        self.weight_shape = torch.Size(weight_shape)
        self.geometry = conv_arguments(base_layer) if self.kind == "conv2d" else {}
        self.tucker = tucker and self.kind == "conv2d" and kernel != (1, 1)
        self.rank = rank
        device = base_layer.weight.device
        if self.tucker:
            self.hada_w1_a = nn.Parameter(torch.zeros(rank, out_dim, device=device))
            self.hada_w2_a = nn.Parameter(torch.empty(rank, out_dim, device=device))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim, device=device))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim, device=device))
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *kernel, device=device))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *kernel, device=device))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            fan_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
            self.hada_w1_a = nn.Parameter(torch.zeros(out_dim, rank, device=device))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank, device=device))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, fan_in, device=device))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, fan_in, device=device))
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.normal_(self.hada_w2_a, std=0.1)
        alpha = float(rank if alpha is None else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scaling = alpha / rank
        self._register_load_state_dict_pre_hook(self._refresh_scaling)

    def _refresh_scaling(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix + "alpha" in state_dict:
            self.scaling = float(state_dict[prefix + "alpha"]) / self.rank

    def unit_delta_weight(self) -> torch.Tensor:
        if self.tucker:
            half1 = tucker_half(self.hada_t1, self.hada_w1_b, self.hada_w1_a)
            half2 = tucker_half(self.hada_t2, self.hada_w2_b, self.hada_w2_a)
            return half1 * half2
        return hadamard_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b).reshape(self.weight_shape)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        s = scale * self.scaling
        x = x.to(self.hada_w1_b.dtype)
        if self.kind == "linear":
            return _HadamardLinear.apply(x, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, s)
        return F.conv2d(x, self.unit_delta_weight() * s, **self.geometry)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.scaling * self.unit_delta_weight()

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        tucker = "hada_t1" in tensors
        rank = tensors["hada_w1_b"].shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
        return {"rank": rank, "alpha": alpha, "tucker": tucker}
