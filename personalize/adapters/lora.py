"""LoRA (arXiv 2106.09685) with the LoCon, DoRA, rsLoRA and LoRA-FA variants.

    y = W x + s * B(A(dropout(x))),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

A ("lora_down", r x in) starts kaiming-uniform (a = sqrt(5)) or N(0, 1/r) ("gaussian", as diffusers'
scripts); B ("lora_up", out x r) starts at zero so the model is unchanged at step 0. On a conv (LoCon),
A is a conv with the base kernel, stride and padding and B a 1x1 conv. LoRA-FA (arXiv 2308.03303)
freezes A. DoRA (arXiv 2402.09353) learns a magnitude m per output row:

    W' = m * (W + s BA) / ||W + s BA||_row      (the norm is detached, as in the paper)

The `alpha` buffer holds the *effective* alpha (alpha/r == s for every reader), so an rsLoRA adapter
stores alpha * sqrt(r) and loads in tools that only know alpha / r.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters.base import AdapterModule, check_positive, conv_arguments, layer_kind
from personalize.adapters.quant import dequantized_weight
from personalize.errors import UserError

INITS = ("kaiming", "gaussian")


def lora_delta_weight(down: torch.Tensor, up: torch.Tensor, kind: str, weight_shape: torch.Size) -> torch.Tensor:
    """dW = up @ down (before scaling), shaped like the base weight."""
    if kind == "embedding":  # base weight (num, dim); down (r, num), up (dim, r)
        return (up @ down).T
    return (up.flatten(1) @ down.flatten(1)).reshape(weight_shape)  # (out, in[, kh, kw])


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_row keeping dims: (out, 1) for Linear, (out, 1, 1, 1) for Conv2d."""
    return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *([1] * (weight.dim() - 1)))


def output_channels_view(vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(C, 1[, 1, 1]) -> broadcastable over an output (..., C) or (B, C, H, W)."""
    flat = vector.reshape(-1)
    return flat.reshape(1, -1, 1, 1) if out.dim() == 4 else flat


class LoRA(AdapterModule):
    method = "lora"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "kaiming",
        rslora: bool = False,
        dora: bool = False,
        fa: bool = False,
    ) -> None:
        super().__init__()
        check_positive("lora", rank=rank)
        if init not in INITS:
            raise UserError(f"lora: init must be one of {', '.join(INITS)} (got '{init}')")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"lora: dropout must be in [0, 1) (got {dropout})")
        alpha = float(rank if alpha is None else alpha)
        self.kind = layer_kind(base_layer)
        self.rank = rank
        if self.kind == "linear":
            self.lora_down = nn.Linear(base_layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base_layer.out_features, bias=False)
        elif self.kind == "conv2d":
            geometry = conv_arguments(base_layer)
            self.lora_down = nn.Conv2d(base_layer.in_channels, rank, base_layer.kernel_size, bias=False, **geometry)
            self.lora_up = nn.Conv2d(rank, base_layer.out_channels, 1, bias=False)
        else:
            if dora:
                raise UserError("lora: DoRA is defined for Linear and Conv2d layers, not Embedding")
            self.lora_down = nn.Linear(base_layer.num_embeddings, rank, bias=False)
            self.lora_up = nn.Linear(rank, base_layer.embedding_dim, bias=False)
            self.padding_idx = base_layer.padding_idx
        self.to(device=base_layer.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        effective_alpha = alpha * math.sqrt(rank) if rslora else alpha
        self.register_buffer("alpha", torch.tensor(effective_alpha))
        self.scaling = effective_alpha / rank
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_down.weight, std=1.0 / rank)
            else:
                nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_up.weight)
        if fa:
            self.lora_down.weight.requires_grad_(False)
        if dora:
            self.dora_scale = nn.Parameter(row_norm(dequantized_weight(base_layer).detach().float()))
        self.method = "dora" if dora else "lora"
        self._load_hook = self._register_load_state_dict_pre_hook(self._refresh_scaling)

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self._parameters

    def _refresh_scaling(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix + "alpha" in state_dict:
            self.scaling = float(state_dict[prefix + "alpha"]) / self.rank

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            down = F.embedding(x, self.lora_down.weight.T, padding_idx=self.padding_idx)  # (..., r)
            return down @ self.lora_up.weight.T  # (..., dim)
        return self.lora_up(self.lora_down(self.dropout(x.to(self.lora_down.weight.dtype))))

    def unit_delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return lora_delta_weight(self.lora_down.weight, self.lora_up.weight, self.kind, weight.shape)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        s = scale * self.scaling
        lora = self.lora_output(x)
        if not self.is_dora:
            return s * lora
        weight = dequantized_weight(base_layer).detach().float()
        combined = weight + s * self.unit_delta_weight(weight)
        magnitude = output_channels_view(self.dora_scale / row_norm(combined).detach(), base_out)
        base_no_bias = (
            base_out if base_layer.bias is None else base_out - output_channels_view(base_layer.bias, base_out)
        )
        return (magnitude - 1) * base_no_bias.to(lora.dtype) + magnitude * s * lora

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        if self.is_dora:
            weight = base_weight.float()
            combined = weight + self.scaling * self.unit_delta_weight(weight)
            return self.dora_scale / row_norm(combined) * combined - weight
        # s (B A): scale the small factor, not the (out, in) product
        return lora_delta_weight(
            self.lora_down.weight, self.lora_up.weight * self.scaling, self.kind, base_weight.shape
        )

    def merged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.is_dora:
            return super().merged(weight, scale)
        combined = weight.float() + scale * self.scaling * self.unit_delta_weight(weight)
        self._merge_norm = row_norm(combined)
        return (self.dora_scale / self._merge_norm * combined).to(weight.dtype)

    def unmerged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        if not self.is_dora:
            return super().unmerged(weight, scale)
        combined = weight.float() * self._merge_norm / self.dora_scale
        return (combined - scale * self.scaling * self.unit_delta_weight(weight)).to(weight.dtype)

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        rank = tensors["lora_down.weight"].shape[0]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
        return {"rank": rank, "alpha": alpha, "dora": "dora_scale" in tensors}
