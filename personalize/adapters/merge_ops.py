"""Adapter arithmetic on one layer: pure functions on LoRA factors and weight deltas.

Notation: input i has factors A_i = lora_down (r_i, in[, kh, kw]), B_i = lora_up (out, r_i[, 1, 1]) and
scale s_i = alpha_i / r_i, so dW_i = s_i B_i A_i; w_i is its merge weight. Every merged LoRA has scale 1.

    cat          A = [w_i s_i A_i] stacked, B = [B_i] side by side    -> dW = sum_i w_i dW_i exactly
    svd          the best rank-R approximation of sum_i w_i dW_i (Eckart-Young)
    linear       A = sum_i sgn_i sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i  (equal ranks; peft's "linear")
    ties         TIES-merging (Yadav et al. 2023, arXiv 2306.01708): keep the top `density` fraction of each
                 tensor by magnitude, elect a sign per entry (sign of the sum), average the weighted entries
                 that agree with it
    dare         DARE (Yu et al. 2023, arXiv 2311.03099): drop each entry with probability 1 - density and
                 rescale the kept ones by 1 / density, then the weighted sum
    dare-ties    DARE's random drop, then TIES' sign election and disjoint mean
    fusion       Mix-of-Show gradient fusion (Gu et al. 2023, arXiv 2305.18292), see `fusion_delta`

ties / dare / dare-ties / linear apply to the factors A and B separately (what peft's `add_weighted_adapter`
does without "_svd"), or to the full deltas dW_i ("task vectors", as the papers define them, and peft's
"_svd" variants) when given deltas. The relative error of a low-rank result is ||dW - dW_exact||_F /
||dW_exact||_F.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from personalize.errors import UserError

METHODS = ("linear", "cat", "svd", "ties", "dare", "dare-ties", "fusion")
SPARSE_METHODS = ("ties", "dare", "dare-ties")


# --------------------------------------------------------------------------------------- task-vector ops


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest |value|, zero the rest (TIES' trim step)."""
    if density >= 1:
        return tensor
    return magnitude_prune_rows(tensor[None], density)[0]


def magnitude_prune_rows(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """`magnitude_prune` of every row of `stacked` (n, ...): each row keeps exactly its int(density * row
    size) largest |entries|. Returns a new tensor.

    One unsorted `topk` over all rows (a selection: about 3x faster than a sorted `topk` per tensor on
    65k-entry rows), then the kept entries gathered into zeros."""
    rows = stacked.shape[0]
    flat = stacked.reshape(rows, -1)  # (n, size)
    keep = int(density * flat.shape[1])
    if keep >= flat.shape[1]:
        return stacked
    if keep <= 0:
        return torch.zeros_like(stacked)
    index = flat.abs().topk(keep, dim=1, sorted=False).indices  # (n, k)
    return torch.zeros_like(flat).scatter_(1, index, flat.gather(1, index)).view_as(stacked)


def random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: each entry survives with probability `density`; survivors are divided by `density`."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' elect + disjoint merge: per entry, the sign of the sum of the (unweighted) stack wins; the
    weighted entries of that sign are summed and divided by how many there are (at least 1).

    stacked (n, ...) and weights (n,) -> (...). Overwrites `stacked` (its disagreeing entries become 0).
    Sums over the n inputs are matrix-vector products, which run far faster than reductions over dim 0."""
    rows = stacked.shape[0]
    flat = stacked.view(rows, -1)  # (n, size)
    ones = torch.ones(rows, dtype=flat.dtype, device=flat.device)
    elected = torch.where(ones @ flat >= 0, 1.0, -1.0).to(flat.dtype)  # (size,)
    agree = (flat * elected).gt_(0).to(flat.dtype)  # (n, size) 1 where the sign agrees; pruned zeros never do
    count = (ones @ agree).clamp_(min=1.0)  # (size,)
    flat.mul_(agree)
    return (weights.to(flat.dtype) @ flat).div_(count).view(stacked.shape[1:])  # (size,) -> (...)


def _stacked(tensors: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """One (n, ...) tensor the in-place steps may overwrite: a given stacked tensor itself (the caller's to
    give away), else a fresh stack (the inputs stay untouched)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.detach()
    return torch.stack([t.detach() for t in tensors])


@torch.no_grad()
def combine(
    tensors: Sequence[torch.Tensor] | torch.Tensor,
    weights: Sequence[float],
    method: str,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """sum / TIES / DARE / DARE-TIES of same-shaped tensors with `weights` (the task-vector definitions).

    `tensors`: a sequence, or one stacked (n, ...) tensor that the sparse methods overwrite. Random masks
    are drawn in input order from `generator` (one Bernoulli draw per tensor)."""
    w = torch.tensor([float(x) for x in weights], dtype=tensors[0].dtype, device=tensors[0].device)
    if method in ("linear", "svd", "cat", "fusion"):
        if isinstance(tensors, torch.Tensor):
            return torch.tensordot(w, tensors, dims=1)
        return sum(t * wi for t, wi in zip(tensors, w))  # type: ignore[return-value]
    if method == "ties":
        stacked = magnitude_prune_rows(_stacked(tensors), density)  # (n, ...)
    elif method in ("dare", "dare-ties"):
        stacked = _stacked(tensors)
        if density < 1:
            for row in stacked:  # one draw per tensor, in input order (as peft draws them)
                row.mul_(torch.bernoulli(torch.full_like(row, density), generator=generator)).div_(density)
    else:
        raise UserError(f"unknown merge method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "dare":
        return torch.tensordot(w, stacked, dims=1)
    return disjoint_mean(stacked, w)


# ----------------------------------------------------------------------------------------- LoRA factors


def flat_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """B A as (out, in*kh*kw)."""
    return up.flatten(1) @ down.flatten(1)


def cat_factors(
    downs: Sequence[torch.Tensor], ups: Sequence[torch.Tensor], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ranks: A = [c_i A_i] (sum r_i, in[, kh, kw]), B = [B_i] (out, sum r_i[, 1, 1]), c_i = w_i s_i.

    B A = sum_i c_i B_i A_i exactly."""
    down = torch.cat([d * c for d, c in zip(downs, coefficients)], dim=0)
    up = torch.cat(list(ups), dim=1)
    return down, up


def combine_factors(
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    method: str,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear / ties / dare / dare-ties on A and B separately, with sqrt|c_i| on each side (sign on A).

    All ranks must be equal; the merged LoRA keeps that rank. A's masks are drawn before B's."""
    if len({d.shape[0] for d in downs}) != 1:
        ranks = sorted({int(d.shape[0]) for d in downs})
        raise UserError(
            f"'{method}' on LoRA factors needs equal ranks, got {ranks}; use --method cat or svd, or give --rank R "
            "to apply it to the full deltas"
        )
    roots = [math.sqrt(abs(c)) for c in coefficients]
    signed = [r if c >= 0 else -r for r, c in zip(roots, coefficients)]
    down = combine(downs, signed, method, density, generator)
    up = combine(ups, roots, method, density, generator)
    return down, up


def _orthonormal_span(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """matrix (m, k) = Q R with Q (m, k') orthonormal (k' = min(m, k))."""
    return torch.linalg.qr(matrix, mode="reduced")


def svd_of_product(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of left @ right without forming it: left (out, K), right (K, in) -> (down (r, in),
    up (out, r), singular values (min(K, ...))). Exact: QR of both sides, then the SVD of a K x K core."""
    q_left, r_left = _orthonormal_span(left)  # (out, k1), (k1, K)
    q_right, r_right = _orthonormal_span(right.T)  # (in, k2), (k2, K)
    core = r_left @ r_right.T  # (k1, k2)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = (q_left @ u[:, :r]) * root  # (out, r)
    down = root[:, None] * (vh[:r] @ q_right.T)  # (r, in)
    return down, up, s


def svd_of_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of a full delta (out, in) -> (down (r, in), up (out, r), singular values)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root, s


def tail_error(singular: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the rank-`rank` truncation: ||s[r:]|| / ||s||."""
    total = float(singular.norm())
    return float(singular[rank:].norm()) / total if total > 0 else 0.0


def product_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F from the K x K Gram matrices: trace((L^T L)(R R^T)), never forming the product."""
    value = float(((left.T @ left) * (right @ right.T)).sum())
    return math.sqrt(max(value, 0.0))


def factored_distance(
    down: torch.Tensor, up: torch.Tensor, left: torch.Tensor, right: torch.Tensor, theirs_norm: float | None = None
) -> float:
    """||B A - L R||_F from small Gram matrices: ||BA||^2 - 2 <BA, LR> + ||LR||^2, never forming a product.

    down A (r, in...), up B (out, r...), left L (out, K), right R (K, in); `theirs_norm`: ||L R||_F when
    known (`product_norm`: its K x K Grams are the costly part)."""
    a, b = down.flatten(1), up.flatten(1)
    ours = float(((b.T @ b) * (a @ a.T)).sum())
    cross = float(((b.T @ left) * (a @ right.T)).sum())
    theirs = product_norm(left, right) ** 2 if theirs_norm is None else theirs_norm**2
    return math.sqrt(max(ours - 2 * cross + theirs, 0.0))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    norm = float(exact.norm())
    return float((approx - exact).norm()) / norm if norm > 0 else 0.0


# ---------------------------------------------------------------------------------------------- fusion


def fusion_delta(
    deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], regularization: float = 1e-3
) -> torch.Tensor:
    """Mix-of-Show gradient fusion of one layer, in closed form.

    W* = argmin_W sum_i ||(W0 + dW_i) X_i - W X_i||^2 + lam ||W - W0||^2 with G_i = X_i X_i^T (in x in):

        W* - W0 = (sum_i dW_i G_i) (sum_i G_i + lam I)^-1,    lam = regularization * trace(sum_i G_i) / in

    The ridge term pulls directions no subject's inputs reach back to the base weight (Mix-of-Show itself
    runs L-BFGS from W0 on the same objective, which leaves those directions at W0 as well).
    deltas: (out, in) each; grams: (in, in) each -> (out, in)."""
    total = sum(grams)  # (in, in)
    size = total.shape[0]
    lam = regularization * float(total.diagonal().sum()) / size
    lam = lam if lam > 0 else regularization
    right = sum(d @ g for d, g in zip(deltas, grams))  # (out, in)
    system = total + lam * torch.eye(size, dtype=total.dtype, device=total.device)
    # (sum dW_i G_i) S^-1 = (S^-1 (sum dW_i G_i)^T)^T; S is symmetric positive definite.
    factor = torch.linalg.cholesky(system)
    return torch.cholesky_solve(right.T, factor).T
