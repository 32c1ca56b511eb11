"""LoKr (LyCORIS; arXiv 2309.14859) and KronA / DiffuseKronA (arXiv 2212.10650, 2402.17412).

    dW = s * kron(w1, w2),   w1 (l, m) the small block, w2 (k, n[, kh, kw]),  out = l*k, in = m*n

Factor sizes follow LyCORIS's `factorization(dim, factor)`: factor dividing dim -> (factor, dim/factor),
factor = -1 -> the most balanced pair (320 -> 16 x 20). w2 is low-rank (w2_a (k, r) @ w2_b (r, n*kh*kw))
when r < max(k, n) / 2 (on a conv with `tucker`: a core t2 (r, r, kh, kw) between w2_a (r, k) and
w2_b (r, n), LyCORIS's use_tucker), w1 likewise only with `decompose_both`; s = alpha / r when a factor is
low-rank, else 1 (alpha is ignored, as in LyCORIS and ComfyUI). KronA fixes w1 to (a1, a2), keeps both
factors full (s = 1) and starts w1 ~ N(0, 1/a1) (variance), w2 = 0; it is stored in this LoKr layout
so that every LoKr reader reads it.

Training never builds the (out x in) delta. With X = x viewed as (..., m, n):

    kron(w1, w2) @ vec(X) = vec(w1 @ X @ w2^T)          # (..., l, k), cost O(tokens*(l*m*n + l*k*n))

and on a conv, w2 (k, n, kh, kw) convolves each of the m channel groups, then w1 mixes the groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, base_weight_shape, check_positive, conv_arguments, layer_kind
from personalize.adapters.loha import tucker_half
from personalize.errors import UserError


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n == dimension, m <= n: `factor` itself if it divides, else the most balanced
    pair whose smaller side does not exceed `factor` (-1: no limit)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))  # type: ignore[return-value]
    limit = dimension if factor < 0 else factor
    best = (1, dimension)
    for m in range(2, math.isqrt(dimension) + 1):
        if m > limit:
            break
        if dimension % m == 0:
            best = (m, dimension // m)
    return best


@dataclass(frozen=True)
class KronPlan:
    """Factor shapes: w1 (l, m) low-rank when w1_rank, w2 (k, n, *kernel) low-rank when w2_rank."""

    l: int  # noqa: E741
    m: int
    k: int
    n: int
    kernel: tuple[int, ...]
    w1_rank: int | None
    w2_rank: int | None
    tucker: bool = False  # w2 = t2 x1 w2_a x2 w2_b (a conv's low-rank w2 only)

    @property
    def full(self) -> bool:
        return self.w1_rank is None and self.w2_rank is None


def lokr_plan(
    out_dim: int,
    in_dim: int,
    kernel: tuple[int, ...],
    rank: int,
    factor: int,
    decompose_both: bool,
    full_matrix: bool,
    tucker: bool = False,
) -> KronPlan:
    l, k = factorization(out_dim, factor)  # noqa: E741
    m, n = factorization(in_dim, factor)
    w1_rank = rank if decompose_both and not full_matrix and rank < max(l, m) / 2 else None
    w2_rank = rank if not full_matrix and rank < max(k, n) / 2 else None
    tucker = tucker and w2_rank is not None and any(size != 1 for size in kernel)
    return KronPlan(l, m, k, n, kernel, w1_rank, w2_rank, tucker)


def krona_plan(out_dim: int, in_dim: int, kernel: tuple[int, ...], a1: int, a2: int) -> KronPlan:
    if out_dim % a1 or in_dim % a2:
        raise UserError(
            f"krona: a1={a1} must divide the layer's {out_dim} outputs and a2={a2} its {in_dim} inputs; "
            "pick divisors (e.g. --set adapter.a1=8) or target other layers"
        )
    return KronPlan(a1, a2, out_dim // a1, in_dim // a2, kernel, None, None)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) with the kernel of w2 kept: (l, m) x (k, n[, kh, kw]) -> (l*k, m*n[, kh, kw])."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x (..., m*n) -> (..., l*k) = x @ kron(w1, w2)^T without building the Kronecker product.

    Applies first the factor that leaves the smaller intermediate: (..., m, k) or (..., l, n)."""
    (l, m), (k, n) = w1.shape, w2.shape  # noqa: E741
    X = x.reshape(*x.shape[:-1], m, n)  # (..., m, n)
    Y = w1 @ (X @ w2.T) if m * k <= l * n else (w1 @ X) @ w2.T  # (..., l, k)
    return Y.reshape(*x.shape[:-1], l * k)


def kron_linear_low_rank(x: torch.Tensor, w1: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor) -> torch.Tensor:
    """As kron_linear with w2 = w2_a (k, r) @ w2_b (r, n), never building w2: the rank-r side comes first,
    so the intermediates are (..., m, r) and (..., l, r)."""
    m, n = w1.shape[1], w2_b.shape[1]
    X = x.reshape(*x.shape[:-1], m, n)  # (..., m, n)
    Y = (w1 @ (X @ w2_b.T)) @ w2_a.T  # (..., m, r) -> (..., l, r) -> (..., l, k)
    return Y.reshape(*x.shape[:-1], -1)


def kron_conv2d(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, geometry: dict) -> torch.Tensor:
    """x (B, m*n, H, W) -> (B, l*k, H', W') = conv2d(x, kron(w1, w2)) by m grouped convs and a mix."""
    batch, _, height, width = x.shape
    m, n = w1.shape[1], w2.shape[1]
    grouped = x.reshape(batch * m, n, height, width)  # (B*m, n, H, W)
    z = nn.functional.conv2d(grouped, w2, **geometry)  # (B*m, k, H', W')
    z = z.reshape(batch, m, *z.shape[1:])  # (B, m, k, H', W')
    y = torch.einsum("lm,bmkhw->blkhw", w1, z)  # (B, l, k, H', W')
    return y.reshape(batch, -1, *y.shape[-2:])


class LoKr(AdapterModule):
    method = "lokr"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 4,
        alpha: float | None = None,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        tucker: bool = False,
        plan: KronPlan | None = None,
        krona_init: bool = False,
    ) -> None:
        super().__init__()
        check_positive("lokr", rank=rank)
        if factor == 0 or factor < -1:
            raise UserError(f"lokr: factor must be -1 (balanced) or a positive divisor (got {factor})")
        self.kind = layer_kind(base_layer)
        if self.kind == "embedding":
            raise UserError("lokr wraps Linear and Conv2d layers, not Embedding")
        weight_shape = base_weight_shape(base_layer)
        kernel = tuple(weight_shape[2:])
        self.weight_shape = torch.Size(weight_shape)
        self.geometry = conv_arguments(base_layer) if self.kind == "conv2d" else {}
        plan = plan or lokr_plan(*weight_shape[:2], kernel, rank, factor, decompose_both, full_matrix, tucker)
        self.plan = plan
        self.rank = plan.w2_rank or plan.w1_rank or rank
        device = base_layer.weight.device
        kernel_size = math.prod(kernel) if kernel else 1

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=device))

        if plan.w1_rank is None:
            self.lokr_w1 = param(plan.l, plan.m)
        else:
            self.lokr_w1_a, self.lokr_w1_b = param(plan.l, plan.w1_rank), param(plan.w1_rank, plan.m)
        if plan.w2_rank is None:
            self.lokr_w2 = param(plan.k, plan.n, *kernel)
        elif plan.tucker:  # LyCORIS's layout: both 1-mode factors (r, dim)
            self.lokr_t2 = param(plan.w2_rank, plan.w2_rank, *kernel)
            self.lokr_w2_a, self.lokr_w2_b = param(plan.w2_rank, plan.k), param(plan.w2_rank, plan.n)
        else:
            self.lokr_w2_a, self.lokr_w2_b = param(plan.k, plan.w2_rank), param(plan.w2_rank, plan.n * kernel_size)
        with torch.no_grad():
            names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_t2")
            for tensor in (getattr(self, n, None) for n in names):
                if tensor is not None:
                    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w2 if plan.w2_rank is None else self.lokr_w2_b)
            if krona_init:
                nn.init.normal_(self.lokr_w1, std=1.0 / math.sqrt(plan.l))
        alpha = float(self.rank if alpha is None or plan.full else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scaling = 1.0 if plan.full else alpha / self.rank
        self._register_load_state_dict_pre_hook(self._refresh_scaling)

    def _refresh_scaling(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if prefix + "alpha" in state_dict and not self.plan.full:
            self.scaling = float(state_dict[prefix + "alpha"]) / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1 (l, m), w2 (k, n[, kh, kw])) rebuilt from their low-rank parts where needed."""
        w1 = self.lokr_w1 if self.plan.w1_rank is None else self.lokr_w1_a @ self.lokr_w1_b
        if self.plan.w2_rank is None:
            w2 = self.lokr_w2
        elif self.plan.tucker:
            w2 = tucker_half(self.lokr_t2, self.lokr_w2_b, self.lokr_w2_a)  # (k, n, kh, kw)
        else:
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.plan.k, self.plan.n, *self.plan.kernel)
        return w1, w2

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        s = scale * self.scaling
        if self.kind == "linear" and self.plan.w2_rank is not None:
            w1 = self.lokr_w1 if self.plan.w1_rank is None else self.lokr_w1_a @ self.lokr_w1_b
            return kron_linear_low_rank(x.to(w1.dtype), w1 * s, self.lokr_w2_a, self.lokr_w2_b)
        w1, w2 = self.factors()
        x = x.to(w1.dtype)
        if self.kind == "conv2d":
            return kron_conv2d(x, w1 * s, w2, self.geometry)
        return kron_linear(x, w1 * s, w2)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.factors()
        return self.scaling * kron_delta(w1, w2).reshape(self.weight_shape)

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor], weight_shape: torch.Size) -> dict[str, Any]:
        w1 = tensors.get("lokr_w1")
        l, m = w1.shape if w1 is not None else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])  # noqa: E741
        w1_rank = None if w1 is not None else tensors["lokr_w1_a"].shape[1]
        tucker = "lokr_t2" in tensors
        w2_rank = None if "lokr_w2" in tensors else tensors["lokr_t2" if tucker else "lokr_w2_a"].shape[1]
        out_dim, in_dim, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
        if out_dim % l or in_dim % m:
            raise UserError(f"LoKr factor w1 {tuple((l, m))} does not divide the layer weight {tuple(weight_shape)}")
        plan = KronPlan(l, m, out_dim // l, in_dim // m, kernel, w1_rank, w2_rank, tucker)
        rank = w2_rank or w1_rank or 1
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
        return {"rank": rank, "alpha": alpha, "plan": plan}


def krona(base_layer: nn.Module, a1: int = 64, a2: int = 8) -> LoKr:
    """A KronA / DiffuseKronA adapter: kron(A (a1, a2), B (out/a1, in/a2)), both full, scale 1."""
    check_positive("krona", a1=a1, a2=a2)
    if layer_kind(base_layer) == "embedding":
        raise UserError("krona wraps Linear and Conv2d layers, not Embedding")
    shape = base_weight_shape(base_layer)
    plan = krona_plan(shape[0], shape[1], tuple(shape[2:]), a1, a2)
    adapter = LoKr(base_layer, rank=1, plan=plan, krona_init=True)
    adapter.method = "krona"
    return adapter
