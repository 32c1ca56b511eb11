"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): LoRA in SVD form with rank reallocation.

    y = W x + (alpha / r0) * P diag(lambda) Q x          Q (r0, in) "lora_A", lambda (r0, 1) "lora_E",
                                                         P (out, r0) "lora_B", r0 = the initial rank

lambda starts at 0 and Q, P at N(0, 0.02^2), as peft. Training adds the orthogonality penalty
R = mean over matrices of ||Q Q^T - I||_F and ||P^T P - I||_F (weight `orth_reg_weight`). After each
optimizer step the importance of every triplet (P_:i, lambda_i, Q_i:) is smoothed sensitivity times
uncertainty (|p * grad| with EMAs beta1, beta2), and the total budget of kept triplets falls on a cubic
schedule from r0 per module to `target_rank` per module between step `init_warmup` and
`total_steps - final_warmup` (every `interval` steps); the least important triplets over ALL modules
get lambda_i = 0. The rank pattern (which triplets each module keeps) is what peft saves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, check_positive, layer_kind
from personalize.errors import UserError

AB_NAMES = ("lora_A", "lora_B")


class AdaLoRA(AdapterModule):
    method = "adalora"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 12,
        alpha: float | None = None,
        target_rank: int = 8,
        dropout: float = 0.0,
        init_warmup: int = 0,
        final_warmup: int = 0,
        interval: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        total_steps: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("adalora", rank=rank, target_rank=target_rank, interval=interval)
        if layer_kind(base_layer) != "linear":
            raise UserError(f"adalora wraps Linear layers, not {type(base_layer).__name__}")
        if target_rank > rank:
            raise UserError(f"adalora: target_rank ({target_rank}) must not exceed the initial rank ({rank})")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise UserError(f"adalora: beta1 and beta2 must be in (0, 1) (got {beta1}, {beta2})")
        if orth_reg_weight < 0:
            raise UserError(f"adalora: orth_reg_weight must be >= 0 (got {orth_reg_weight})")
        device = base_layer.weight.device
        self.rank = rank
        self.lora_A = nn.Parameter(torch.randn(rank, base_layer.in_features, device=device) * 0.02)  # Q (r0, in)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, device=device))  # lambda (r0, 1)
        self.lora_B = nn.Parameter(torch.randn(base_layer.out_features, rank, device=device) * 0.02)  # P (out, r0)
        self.register_buffer("alpha", torch.tensor(float(rank if alpha is None else alpha)))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.schedule = {
            "target_rank": target_rank,
            "init_warmup": init_warmup,
            "final_warmup": final_warmup,
            "interval": interval,
            "total_steps": total_steps,
        }
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.sensitivity: dict[str, torch.Tensor] = {}  # EMA of |p * grad|, per parameter
        self.uncertainty: dict[str, torch.Tensor] = {}  # EMA of |ipt - EMA(ipt)|

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * (scale * self.scaling)  # (..., out)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling  # (out, in)

    def kept(self) -> torch.Tensor:
        """Which triplets are alive (lambda_i != 0), (r0,) bool."""
        return self.lora_E.detach().reshape(-1) != 0

    def regularization(self) -> list[torch.Tensor]:
        """||Q Q^T - I||_F and ||P^T P - I||_F (peft averages them over all matrices)."""
        qq = self.lora_A @ self.lora_A.T  # (r0, r0)
        pp = self.lora_B.T @ self.lora_B  # (r0, r0)
        eye = torch.eye(self.rank, device=qq.device, dtype=qq.dtype)
        return [torch.linalg.matrix_norm(qq - eye), torch.linalg.matrix_norm(pp - eye)]

    def update_importance(self) -> None:
        """One EMA step of sensitivity and uncertainty from the current gradients."""
        for name, param in (("lora_A", self.lora_A), ("lora_E", self.lora_E), ("lora_B", self.lora_B)):
            if param.grad is None:
                continue
            ipt = (param.detach() * param.grad.detach()).abs()
            average = self.sensitivity.get(name, torch.zeros_like(ipt))
            self.sensitivity[name] = self.beta1 * average + (1 - self.beta1) * ipt
            spread = (ipt - self.sensitivity[name]).abs()
            self.uncertainty[name] = (
                self.beta2 * self.uncertainty.get(name, torch.zeros_like(ipt)) + (1 - self.beta2) * spread
            )

    def triplet_scores(self) -> torch.Tensor:
        """Importance of each triplet: score(lambda_i) + mean score(Q_i:) + mean score(P_:i), (r0,)."""
        if "lora_E" not in self.sensitivity:
            return torch.zeros(self.rank, device=self.lora_E.device)
        score = {name: self.sensitivity[name] * self.uncertainty[name] for name in self.sensitivity}
        return score["lora_E"].reshape(-1) + score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)


def budget_at(step: int, initial: int, target: int, schedule: dict) -> tuple[int, bool]:
    """(kept triplets in all modules, whether to mask at this step): cubic decay, as in the paper.

    b(t) = b_T + (b_0 - b_T) (1 - (t - t_i) / (T - t_f - t_i))^3  between the two warm-up phases."""
    init_warmup, final_warmup, total = schedule["init_warmup"], schedule["final_warmup"], schedule["total_steps"]
    if step <= init_warmup:
        return initial, False
    if step > total - final_warmup:
        return target, True
    progress = 1 - (step - init_warmup) / (total - final_warmup - init_warmup)
    return int((initial - target) * progress**3 + target), step % schedule["interval"] == 0


def mask_to_budget(modules: Sequence[AdaLoRA], budget: int) -> None:
    """Zero lambda_i of the (r0 * modules - budget) least important triplets over all modules."""
    scores = [module.triplet_scores() for module in modules]
    everything = torch.cat(scores)
    if budget >= everything.numel():
        return
    threshold = torch.kthvalue(everything, everything.numel() - budget).values
    with torch.no_grad():
        for module, score in zip(modules, scores):
            module.lora_E.masked_fill_((score <= threshold).reshape(-1, 1), 0.0)


def after_step(modules: Sequence[AdaLoRA], step: int) -> None:
    """Called once after optimizer step `step` (1-based): importance update and rank allocation."""
    schedule = modules[0].schedule
    total, final_warmup = schedule["total_steps"], schedule["final_warmup"]
    if total is None:
        raise UserError("adalora needs total_steps (the trainer sets it from --steps) to schedule the rank budget")
    initial = sum(module.rank for module in modules)
    target = schedule["target_rank"] * len(modules)
    if step < total - final_warmup:
        for module in modules:
            module.update_importance()
        budget, mask_now = budget_at(step, initial, target, schedule)
        if mask_now:
            mask_to_budget(modules, budget)
    elif step == total - final_warmup:
        mask_to_budget(modules, target)
        for module in modules:
            module.final_mask = module.kept()
            module.sensitivity, module.uncertainty = {}, {}
    else:  # final fine-tuning: the pattern is fixed
        with torch.no_grad():
            for module in modules:
                module.lora_E.masked_fill_(~module.final_mask.reshape(-1, 1), 0.0)


def regularization(modules: Sequence[AdaLoRA]) -> torch.Tensor:
    """orth_reg_weight * mean of the orthogonality norms over all Q and P matrices."""
    norms = [norm for module in modules for norm in module.regularization()]
    return modules[0].orth_reg_weight * torch.stack(norms).mean()
