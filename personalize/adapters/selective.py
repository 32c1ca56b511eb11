"""Selective methods: train a subset of the model's own parameters (no new modules).

- `bitfit` (arXiv 2106.10199): every bias.
- `norm` (LayerNorm / GroupNorm tuning, arXiv 2312.11420): weights and biases of normalization layers.
- `unfreeze`: the parameters whose names match `targets` (a regex or exact names).

They go through the same functions as the wrapping methods: the original values are kept so that
`set_scale(s)` gives  p = p0 + s * (p_trained - p0),  `remove` restores p0, and `state_dict` holds the
parameters under the model's own names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

SELECTIVE_METHODS = ("bitfit", "norm", "unfreeze")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d)
REGISTRY_ATTRIBUTE = "_personalize_selective"


@dataclass
class SelectiveAdapter:
    """The parameters one selective adapter trains, with their values before training."""

    method: str
    originals: dict[str, torch.Tensor]
    requires_grad_before: dict[str, bool]
    scale: float = 1.0
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)


def selective_parameter_names(model: nn.Module, method: str, matches: list[str] | None = None) -> list[str]:
    if method == "bitfit":
        return [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if method == "norm":
        return [
            f"{path}.{param}" if path else param
            for path, module in model.named_modules()
            if isinstance(module, NORM_TYPES) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
            for param, _ in module.named_parameters(recurse=False)
        ]
    return list(matches or [])


def registry(model: nn.Module) -> dict[str, SelectiveAdapter]:
    if REGISTRY_ATTRIBUTE not in model.__dict__:
        model.__dict__[REGISTRY_ATTRIBUTE] = {}
    return model.__dict__[REGISTRY_ATTRIBUTE]


def attach(model: nn.Module, method: str, names: list[str]) -> SelectiveAdapter:
    parameters = dict(model.named_parameters())
    adapter = SelectiveAdapter(
        method,
        {name: parameters[name].detach().clone() for name in names},
        {name: parameters[name].requires_grad for name in names},
    )
    for name in names:
        parameters[name].requires_grad_(True)
    return adapter


def current_deltas(model: nn.Module, adapter: SelectiveAdapter) -> dict[str, torch.Tensor]:
    """p_trained - p0 at scale 1 (kept aside while the scale is 0)."""
    if adapter.scale == 0.0:
        return adapter.deltas
    parameters = dict(model.named_parameters())
    return {name: (parameters[name].detach() - p0) / adapter.scale for name, p0 in adapter.originals.items()}


def apply_scale(model: nn.Module, adapter: SelectiveAdapter, scale: float) -> None:
    deltas = current_deltas(model, adapter)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, p0 in adapter.originals.items():
            parameters[name].copy_(p0 + scale * deltas[name])
    adapter.deltas = {name: d.clone() for name, d in deltas.items()} if scale == 0.0 else {}
    adapter.scale = scale


def detach(model: nn.Module, adapter: SelectiveAdapter) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, p0 in adapter.originals.items():
            parameters[name].copy_(p0)
            parameters[name].requires_grad_(adapter.requires_grad_before[name])
