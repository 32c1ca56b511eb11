"""Approximate any weight delta by a LoRA of chosen rank (truncated SVD, Eckart-Young).

    dW (out, in*kh*kw) = U S V^T  ~  (U_r sqrt(S_r)) (sqrt(S_r) V_r^T) = up @ down,   alpha = r (scale 1)
    relative error = ||dW - up @ down||_F / ||dW||_F      (0 when r >= rank(dW), up to rounding)

The delta of a LoHa, LoKr, KronA, DoRA or IA3 module comes from the injection core's own math on the base
weight; the difference of two full checkpoints is taken layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from personalize import adapters
from personalize.adapters import group_by_module
from personalize.errors import UserError

Report = dict[str, float]


def lora_from_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """dW (out, in[, kh, kw]) -> (lora_down (r, in[, kh, kw]), lora_up (out, r[, 1, 1]), relative error)."""
    if rank < 1:
        raise UserError(f"--rank must be at least 1 (got {rank})")
    flat = delta.detach().float().flatten(1)  # (out, in*kh*kw)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = u[:, :r] * root  # (out, r)
    down = root[:, None] * vh[:r]  # (r, in*kh*kw)
    norm = flat.norm()
    error = float((flat - up @ down).norm() / norm) if norm > 0 else 0.0
    if delta.dim() == 4:
        return down.reshape(r, *delta.shape[1:]), up.reshape(*up.shape, 1, 1), error
    return down, up, error


def _layer_like(base: nn.Module) -> nn.Module:
    """A plain layer with the geometry and weight of `base` (weights shared, never modified)."""
    weight = adapters.dequantized_weight(base).detach()
    if isinstance(base, nn.Conv2d):
        layer = nn.Conv2d(
            base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
        )
    elif isinstance(base, nn.Embedding):
        layer = nn.Embedding(base.num_embeddings, base.embedding_dim)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def module_delta(group: Mapping[str, torch.Tensor], base: nn.Module) -> torch.Tensor:
    """dW at scale 1 of one module's canonical parameters on `base`, shaped like the base weight."""
    holder = nn.Sequential(_layer_like(base))
    adapters.inject_from_state_dict(holder, {f"0.{k}": v for k, v in group.items()}, name="svd")
    layer = holder[0]
    with torch.no_grad():
        return layer.adapters["svd"].delta_weight(layer.base_layer.weight).float()


def _base_layer(model: nn.Module, path: str) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise UserError(f"layer {path} does not exist in this {type(model).__name__}") from None
    return getattr(module, "base_layer", module)


def deltas_to_lora(deltas: Mapping[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], Report]:
    """{path: dW} -> (canonical LoRA state dict, {path: relative error} plus "overall")."""
    sd: dict[str, torch.Tensor] = {}
    report: Report = {}
    residual = total = 0.0
    for path, delta in deltas.items():
        down, up, error = lora_from_delta(delta, rank)
        sd[f"{path}.lora_down.weight"], sd[f"{path}.lora_up.weight"] = down, up
        sd[f"{path}.alpha"] = torch.tensor(float(down.shape[0]))
        report[path] = error
        norm2 = float(delta.float().norm()) ** 2
        residual, total = residual + error**2 * norm2, total + norm2
    report["overall"] = math.sqrt(residual / total) if total > 0 else 0.0
    return sd, report


def adapter_to_lora(
    sd: Mapping[str, torch.Tensor], model: nn.Module, rank: int
) -> tuple[dict[str, torch.Tensor], Report]:
    """Any canonical adapter on `model` -> a LoRA of rank `rank` and the approximation report."""
    deltas = {}
    for path, group in group_by_module(sd).items():
        base = _base_layer(model, path)
        delta = module_delta(group, base)
        deltas[path] = delta.T if isinstance(base, nn.Embedding) else delta  # Embedding LoRA factors (dim, num)
    return deltas_to_lora(deltas, rank)


def checkpoint_deltas(tuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{path: W_tuned - W_base} for every 2-D / 4-D "<path>.weight" that changed (full fine-tunes)."""
    deltas = {}
    for key, value in tuned.items():
        if not key.endswith(".weight") or value.dim() not in (2, 4) or key not in base:
            continue
        if base[key].shape != value.shape:
            raise UserError(f"{key} has shape {tuple(value.shape)} in one checkpoint and {tuple(base[key].shape)}")
        delta = value.float() - base[key].float()
        if delta.abs().max() > 0:
            deltas[key[: -len(".weight")]] = delta
    return deltas
