"""DiffFit (Xie et al., arXiv 2304.06648): fine-tune biases, norms and learned per-block scale factors.

DiffFit adapts a diffusion transformer by training only (a) every bias term (BitFit), (b) the
normalization layers' weights and biases, and (c) new scale factors gamma, initialized to 1, on the
residual branches of each block:

    x <- x + gamma_attn * Attn(x),   x <- x + gamma_ff * FF(x)     gamma in R^d, gamma = 1 at start

Here gamma sits on each branch's output projection (attention `to_out.0` / `to_add_out`, feed-forward
`net.2`, a ResNet block's `conv2`, Flux's single-block `proj_out`, `o_proj`/`fc2`/`out_proj` in
transformers models) and scales that layer's W x; the layer's bias trains on its own (b), which spans
the same functions as scaling W x + b and keeps the factor mergeable into W:

    y = (1 + s (gamma - 1)) * (W x) + b          (s: the adapter's scale; stored as `difffit_gamma`)

One DiffFit adapter is both parts under one name: the gamma layers (wrapped) and the biases and norms
(a selective adapter); `state_dict`, `set_scale`, `remove` act on both.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, base_weight_shape, layer_kind
from personalize.adapters.lora import output_channels_view
from personalize.errors import UserError
from personalize.models.presets import model_kind

# The last projection of each residual branch, per kind of model (full-path regexes).
BRANCH_OUTPUTS = {
    "unet": r"(.*\.)?(attn[12]\.to_out\.0|ff\.net\.2|resnets\.\d+\.conv2)",
    "dit": r"(.*\.)?(attn\.to_out\.0|attn\.to_add_out|ff\.net\.2|ff_context\.net\.2|"
    r"single_transformer_blocks\.\d+\.proj_out)",
}
GENERIC_BRANCH_OUTPUTS = r"(.*\.)?(o_proj|down_proj|out_proj|fc2|attention\.output\.dense|output\.dense)"


def branch_targets(model: nn.Module) -> str:
    """The regex of the branch output layers DiffFit scales in this kind of model."""
    return BRANCH_OUTPUTS.get(model_kind(model), GENERIC_BRANCH_OUTPUTS)


class DiffFitScale(AdapterModule):
    method = "difffit"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if layer_kind(base_layer) == "embedding":
            raise UserError("difffit scales Linear and Conv2d outputs, not Embedding")
        out_features = base_weight_shape(base_layer)[0]
        self.difffit_gamma = nn.Parameter(torch.ones(out_features, device=base_layer.weight.device))

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        bias = base_layer.bias
        wx = base_out if bias is None else base_out - output_channels_view(bias, base_out)
        return output_channels_view(scale * (self.difffit_gamma - 1), base_out) * wx

    def _factor(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        gamma = 1 + scale * (self.difffit_gamma.to(weight.dtype) - 1)
        return gamma.reshape(-1, *([1] * (weight.dim() - 1)))

    def merged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight * self._factor(weight, scale)

    def unmerged(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return weight / self._factor(weight, scale)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.merged(base_weight, 1.0) - base_weight

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {}


def selected_parameters(model: nn.Module, names: list[str]) -> list[str]:
    """Biases and norm parameters (DiffFit's selective part), without any adapter's own parameters."""
    return [n for n in names if ".adapters." not in n and re.search(r"difffit_gamma$", n) is None]
