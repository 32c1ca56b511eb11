"""Sparse selective fine-tuning: train a chosen subset of a weight's entries, store only those.

    W' = W + M (.) D        D (out, in) trainable, zero at step 0;  M a 0/1 mask of the same shape

- FISH mask (Sung et al., NeurIPS 2021, arXiv 2111.09839): M keeps the `density` fraction of entries
  with the largest empirical Fisher information, F_i = mean over calibration batches of (dL/dW_i)^2,
  ranked over ALL wrapped layers together; fixed for the whole run.
- Child-Tuning (Xu et al., EMNLP 2021, arXiv 2109.05687): `mode: d` (task-driven) picks the child
  network the same way, from the Fisher information, with `density` = p_D; `mode: f` (task-free) draws
  a fresh Bernoulli(density) mask of the GRADIENT at every step and scales it by 1 / density.
- Diff-Pruning (Guo et al., ACL 2021, arXiv 2012.07463): D = z (.) w with z a hard-concrete gate per
  entry (log alpha trained, temperature 2/3, stretch (-0.1, 1.1)) and the expected-L0 penalty
  `l0_weight` * mean P(z != 0) added to the loss; at the end (`finalize`) the `density` fraction of
  entries with the largest |D| is kept (the paper's magnitude projection) and the rest are zero.

The file stores only M's entries: "<path>.sparse_index" (int64 flat indices) and "<path>.sparse_value"
(their D), plus "<path>.sparse_shape"; `pack` / `unpack` convert.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, check_positive, layer_kind
from personalize.errors import UserError

FISHER_METHODS = ("fish-mask", "child-tuning")
SPARSE_METHODS = ("fish-mask", "child-tuning", "diff-pruning")
CHILD_MODES = ("d", "f")
# hard-concrete constants (Louizos et al. 2018), as Diff-Pruning
BETA, LOW, HIGH = 2.0 / 3.0, -0.1, 1.1


def _check_density(method: str, density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise UserError(f"{method}: density must be in (0, 1] (got {density})")


class SparseDelta(AdapterModule):
    """FISH mask and Child-Tuning: a dense trainable D under a mask (set by `calibrate`, or drawn per step)."""

    method = "fish-mask"

    def __init__(self, base_layer: nn.Module, density: float = 0.005, mode: str = "d") -> None:
        super().__init__()
        _check_density(self.method, density)
        if layer_kind(base_layer) != "linear":
            raise UserError(f"{self.method} wraps Linear layers, not {type(base_layer).__name__}")
        if mode not in CHILD_MODES:
            raise UserError(f"child-tuning: mode must be d (Fisher) or f (random per step), got '{mode}'")
        shape = (base_layer.out_features, base_layer.in_features)
        device = base_layer.weight.device
        self.delta_values = nn.Parameter(torch.zeros(shape, device=device))  # D (out, in)
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))  # M, all until calibrated
        self.density, self.mode = density, mode
        self.fisher: torch.Tensor | None = None
        if mode == "f":
            self.delta_values.register_hook(self._random_gradient_mask)

    def _random_gradient_mask(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return grad
        keep = torch.rand_like(grad) < self.density
        return grad * keep / self.density  # Child-Tuning_F: Bernoulli(p) gradient mask, rescaled by 1/p

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.delta_values * self.mask  # (out, in)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        return (x.to(self.delta_values.dtype) @ self.delta_weight().T) * scale  # (..., out)

    def accumulate_fisher(self) -> None:
        if self.delta_values.grad is not None:
            square = self.delta_values.grad.detach() ** 2  # dL/dD = dL/dW: D is added to W
            self.fisher = square if self.fisher is None else self.fisher + square


class ChildTuning(SparseDelta):
    method = "child-tuning"

    def __init__(self, base_layer: nn.Module, density: float = 0.3, mode: str = "d") -> None:
        super().__init__(base_layer, density=density, mode=mode)


class DiffPruning(AdapterModule):
    method = "diff-pruning"

    def __init__(
        self, base_layer: nn.Module, density: float = 0.005, l0_weight: float = 1.0, init_alpha: float = 5.0
    ) -> None:
        super().__init__()
        _check_density("diff-pruning", density)
        check_positive("diff-pruning", l0_weight=l0_weight)
        if layer_kind(base_layer) != "linear":
            raise UserError(f"diff-pruning wraps Linear layers, not {type(base_layer).__name__}")
        shape = (base_layer.out_features, base_layer.in_features)
        device = base_layer.weight.device
        self.delta_values = nn.Parameter(torch.zeros(shape, device=device))  # w (out, in)
        self.log_alpha = nn.Parameter(torch.full(shape, init_alpha, device=device))  # gate logits
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))
        self.register_buffer("finalized", torch.tensor(False))  # True: D = M (.) w, the gates are done
        self.density, self.l0_weight = density, l0_weight

    def gate(self) -> torch.Tensor:
        """z in [0, 1]: a stretched, clipped hard-concrete sample in training, its mean gate in eval."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)

    def delta_weight(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        if bool(self.finalized):
            return self.delta_values * self.mask
        return self.delta_values * self.gate()  # (out, in)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        return (x.to(self.delta_values.dtype) @ self.delta_weight().T) * scale

    def expected_l0(self) -> torch.Tensor:
        """mean P(z != 0) = mean sigmoid(log_alpha - beta log(-low / high))."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LOW / HIGH)).mean()


def regularization(modules: Sequence[DiffPruning]) -> torch.Tensor:
    return modules[0].l0_weight * torch.stack([m.expected_l0() for m in modules]).mean()


def after_step(modules: Sequence[nn.Module], step: int) -> None:
    """Nothing between steps: the masks are fixed (FISH, Child-Tuning_D) or drawn in backward (_F)."""


def _keep_top(scores: Sequence[torch.Tensor], density: float) -> list[torch.Tensor]:
    """Masks keeping the `density` fraction of all entries with the largest score (ties broken by order)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    count = max(1, int(round(density * flat.numel())))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, count).indices] = True
    parts = torch.split(chosen, [s.numel() for s in scores])
    return [part.reshape(s.shape) for part, s in zip(parts, scores)]


def calibrate(modules: Sequence[SparseDelta], loss_of: Callable[[dict], torch.Tensor], batches: Iterable[dict]) -> None:
    """FISH / Child-Tuning_D: Fisher information over `batches`, then the global top-`density` mask.

    D is zero, so the forward passes are the base model's; the gradients are dropped afterwards."""
    for module in modules:
        module.mask.fill_(True)
        module.fisher = None
    seen = 0
    for batch in batches:
        loss_of(batch).backward()
        for module in modules:
            module.accumulate_fisher()
            module.delta_values.grad = None
        seen += 1
    if not seen:
        raise UserError("the Fisher information needs at least one calibration batch")
    masks = _keep_top([module.fisher for module in modules], modules[0].density)  # type: ignore[misc]
    for module, mask in zip(modules, masks):
        module.mask.copy_(mask)
        module.fisher = None


def finalize(modules: Sequence[DiffPruning]) -> None:
    """Diff-Pruning's end of training: keep the top-`density` entries of |z (.) w| over all layers."""
    with torch.no_grad():
        for module in modules:
            module.eval()
        deltas = [module.delta_values * module.gate() for module in modules]
        for module, delta, mask in zip(modules, deltas, _keep_top([d.abs() for d in deltas], modules[0].density)):
            module.delta_values.copy_(delta)
            module.mask.copy_(mask)
            module.finalized.fill_(True)


def pack(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical (dense D, mask, ...) -> only the masked entries: sparse_index, sparse_value, sparse_shape."""
    out = {}
    paths = {key.rsplit(".", 1)[0] for key in sd if key.endswith(".delta_values")}
    for path in sorted(paths):
        mask, values = sd[f"{path}.mask"].reshape(-1), sd[f"{path}.delta_values"].reshape(-1)
        index = mask.nonzero().reshape(-1)
        out[f"{path}.sparse_index"] = index.to(torch.int64)
        out[f"{path}.sparse_value"] = values[index].float()
        out[f"{path}.sparse_shape"] = torch.tensor(list(sd[f"{path}.mask"].shape), dtype=torch.int64)
    return out


def unpack(sd: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `pack`, onto a model's adapter state dict `extra` (for the keys pack does not hold)."""
    out = dict(extra)
    paths = {key.rsplit(".", 1)[0] for key in sd if key.endswith(".sparse_index")}
    for path in paths:
        shape = [int(n) for n in sd[f"{path}.sparse_shape"]]
        mask = torch.zeros(math.prod(shape), dtype=torch.bool)
        values = torch.zeros(math.prod(shape))
        mask[sd[f"{path}.sparse_index"]] = True
        values[sd[f"{path}.sparse_index"]] = sd[f"{path}.sparse_value"]
        out[f"{path}.mask"] = mask.reshape(shape)
        out[f"{path}.delta_values"] = values.reshape(shape)
        if f"{path}.finalized" in out:  # a stored Diff-Pruning delta is the final one
            out[f"{path}.finalized"] = torch.tensor(True)
    return out
