"""IncreLoRA-style rank growth (Zhang et al., arXiv 2308.12043): start small, add rank where it matters.

    y = W x + (alpha / r_max) * P diag(lambda * m) Q x       Q (r_max, in) "lora_A", lambda (r_max, 1)
                                                             "lora_E", P (out, r_max) "lora_B", m the
                                                             0/1 mask of active components ("active")

Each module starts with `rank` active components. Every `interval` optimizer steps the `grow` modules
with the highest importance (the EMA, with `beta`, of mean |theta * grad| over their active parameters)
each gain one component, up to `max_rank` (default 4 * rank). A new component starts with lambda = 0 (the function does
not change) and P, Q ~ N(0, 0.02^2); inactive ones get no gradient. Storage is pre-allocated at
r_max: growing never changes the optimizer's parameter list. The same orthogonality penalty as
AdaLoRA keeps P and Q near-orthogonal. The result is a plain LoRA with per-module rank r_m
(lora_down = lambda Q over the active rows, lora_up = P, alpha_m = alpha * r_m / r_max): it saves
in peft's LoRA layout with a rank_pattern (`increlora_to_lora`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, check_positive, layer_kind
from personalize.errors import UserError


class IncreLoRA(AdapterModule):
    method = "increlora"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 2,
        alpha: float | None = None,
        max_rank: int | None = None,
        interval: int = 10,
        grow: int = 1,
        beta: float = 0.85,
        orth_reg_weight: float = 0.1,
    ) -> None:
        super().__init__()
        max_rank = 4 * rank if max_rank is None else max_rank
        check_positive("increlora", rank=rank, max_rank=max_rank, interval=interval, grow=grow)
        if layer_kind(base_layer) != "linear":
            raise UserError(f"increlora wraps Linear layers, not {type(base_layer).__name__}")
        if rank > max_rank:
            raise UserError(f"increlora: the initial rank ({rank}) must not exceed max_rank ({max_rank})")
        device = base_layer.weight.device
        self.max_rank = max_rank
        self.lora_A = nn.Parameter(torch.randn(max_rank, base_layer.in_features, device=device) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(max_rank, 1, device=device))
        self.lora_B = nn.Parameter(torch.randn(base_layer.out_features, max_rank, device=device) * 0.02)
        active = torch.zeros(max_rank, dtype=torch.bool, device=device)
        active[:rank] = True
        self.register_buffer("active", active)
        self.register_buffer("alpha", torch.tensor(float(max_rank if alpha is None else alpha)))
        self.interval, self.grow, self.beta, self.orth_reg_weight = interval, grow, beta, orth_reg_weight
        self.importance = 0.0

    def gate(self) -> torch.Tensor:
        return self.lora_E * self.active.reshape(-1, 1).to(self.lora_E.dtype)  # (r_max, 1)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        scaling = scale * float(self.alpha) / self.max_rank
        return (x.to(self.lora_A.dtype) @ (self.lora_A * self.gate()).T @ self.lora_B.T) * scaling  # (..., out)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.gate()) * (float(self.alpha) / self.max_rank)  # (out, in)

    def regularization(self) -> list[torch.Tensor]:
        keep = self.active
        qq = self.lora_A[keep] @ self.lora_A[keep].T
        pp = self.lora_B[:, keep].T @ self.lora_B[:, keep]
        eye = torch.eye(qq.shape[0], device=qq.device, dtype=qq.dtype)
        return [torch.linalg.matrix_norm(qq - eye), torch.linalg.matrix_norm(pp - eye)]

    def update_importance(self) -> None:
        if self.lora_A.grad is None or self.lora_B.grad is None or self.lora_E.grad is None:
            return
        keep = self.active
        with torch.no_grad():
            parts = [
                (self.lora_A * self.lora_A.grad)[keep].abs().mean(),
                (self.lora_E * self.lora_E.grad)[keep].abs().mean(),
                (self.lora_B * self.lora_B.grad)[:, keep].abs().mean(),
            ]
        self.importance = self.beta * self.importance + (1 - self.beta) * float(torch.stack(parts).mean())


def after_step(modules: Sequence[IncreLoRA], step: int) -> None:
    """Importance EMA every step; every `interval` steps the `grow` most important modules gain a rank."""
    for module in modules:
        module.update_importance()
    first = modules[0]
    if step % first.interval:
        return
    room = [m for m in modules if int(m.active.sum()) < m.max_rank]
    for module in sorted(room, key=lambda m: m.importance, reverse=True)[: first.grow]:
        module.active[int(module.active.sum())] = True


def regularization(modules: Sequence[IncreLoRA]) -> torch.Tensor:
    norms = [norm for module in modules for norm in module.regularization()]
    return modules[0].orth_reg_weight * torch.stack(norms).mean()


def increlora_to_lora(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical IncreLoRA state dict -> the canonical LoRA state dict of the same function."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        path, _, param = key.rpartition(".")
        groups.setdefault(path, {})[param] = value
    out = {}
    for path, group in groups.items():
        keep = group["active"].bool()
        max_rank = int(keep.numel())
        out[f"{path}.lora_down.weight"] = (group["lora_A"] * group["lora_E"])[keep].detach()  # (r_m, in)
        out[f"{path}.lora_up.weight"] = group["lora_B"][:, keep].detach()  # (out, r_m)
        out[f"{path}.alpha"] = torch.tensor(float(group["alpha"]) * int(keep.sum()) / max_rank)
    return out
