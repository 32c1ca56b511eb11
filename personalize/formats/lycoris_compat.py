"""LoKr/KronA files that LyCORIS's own loader (`create_lycoris_from_weights`) rebuilds, exactly.

ComfyUI and A1111 multiply the stored factors, `dW = s * kron(w1, w2)`, whatever their shapes. LyCORIS
instead rebuilds a `LokrModule` from the file: it infers ONE `factor` per layer from the shapes and
then lays out w1 as (factorization(out, f)[0], factorization(in, f)[0]), the smaller side of both
splits. Files whose factors follow that rule load (our `lokr` with any `factor`); others do not:
DiffuseKronA's a1=64, a2=8 on a 320x320 layer gives w1 (64, 8), w2 (5, 40), which LyCORIS reads as
factor 40 and w1 (8, 8) -- a size mismatch.

Any Kronecker delta can be re-expressed exactly in a layout LyCORIS rebuilds, by factor 1
(w1 = [[1]], w2 = the whole delta) and the mixed-product rule: for M (p, q) write M = M_o @ M_i with
M_o = I_p, M_i = M when p <= q, else M_o = M, M_i = I_q. Then

    kron(A, B) = kron(A_o, B_o) @ kron(A_i, B_i)       rank r = min(A.shape) * min(B.shape)

so w2_a = s * kron(A_o, B_o) (out, r) and w2_b = kron(A_i, B_i) (r, in*kh*kw) with alpha = r (scale 1).
LyCORIS keeps w2 low-rank only when r < max(out, in) / 2; otherwise w2 is written whole (alpha 1,
LyCORIS's full-matrix scale). A conv's flattened delta is kron(A, B.flatten(1)) (the kernel belongs to
B), so the same rule serves convolutions. Nothing is approximated.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

from personalize.adapters.lokr import factorization


def lycoris_factor(w1_shape: tuple[int, int], w2_shape: tuple[int, int], out_dim: int, in_dim: int) -> int:
    """The factor LyCORIS 4.x infers from the factor shapes (`LokrModule.make_module_from_state_dict`)."""
    if w1_shape[0] == factorization(out_dim)[0] and w1_shape[1] == factorization(in_dim)[0]:
        return -1
    for factor in (max(w1_shape), max(w2_shape)):
        fits = out_dim % factor == 0 and in_dim % factor == 0
        if fits and factor in (w1_shape[0], w2_shape[0]) and factor in (w1_shape[1], w2_shape[1]):
            return factor
    return min(max(w1_shape), max(w2_shape))


def _factors(group: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(A (l, m), B flattened (k, n*kh*kw), kernel) of one LoKr module, low-rank factors multiplied out."""
    w1 = group["lokr_w1"] if "lokr_w1" in group else group["lokr_w1_a"] @ group["lokr_w1_b"]
    if "lokr_w2" in group:
        w2 = group["lokr_w2"]
        return w1.float(), w2.float().flatten(1), tuple(w2.shape[2:])
    w2_a, w2_b = group["lokr_w2_a"].float(), group["lokr_w2_b"].float()
    return w1.float(), w2_a @ w2_b.flatten(1), ()


def _scale(group: Mapping[str, torch.Tensor]) -> float:
    """s = alpha / r when a factor is low-rank (r = its inner size), else 1: what every reader applies."""
    for key in ("lokr_w2_a", "lokr_w1_a"):
        if key in group:
            rank = group[key].shape[1]
            return float(group["alpha"]) / rank if "alpha" in group else 1.0
    return 1.0


def rebuilds_in_lycoris(group: Mapping[str, torch.Tensor]) -> bool:
    """Whether LyCORIS's loader lays out this module's factors with the shapes the file holds.

    LyCORIS sees w1 (l, m) and w2 (k, n) -- n is w2_b's width for a low-rank w2 -- infers the factor
    from them, then splits the layer's (l*k, m*n) with it; the file loads when that split gives (l, m)."""
    if "lokr_t2" in group:  # Tucker files are written in LyCORIS's own conv layout
        return True
    w1 = group["lokr_w1"] if "lokr_w1" in group else group["lokr_w1_a"] @ group["lokr_w1_b"]
    w2 = group["lokr_w2"] if "lokr_w2" in group else group["lokr_w2_a"] @ group["lokr_w2_b"]
    (l, m), (k, n) = w1.shape, w2.shape[:2]  # noqa: E741
    factor = lycoris_factor((l, m), (k, n), l * k, m * n)
    return factorization(l * k, factor)[0] == l and factorization(m * n, factor)[0] == m


def _split(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M (p, q) = M_o @ M_i with inner size min(p, q): the identity on the smaller side."""
    p, q = matrix.shape
    eye = torch.eye(min(p, q), dtype=matrix.dtype)
    return (eye, matrix) if p <= q else (matrix, eye)


def as_factor_one(group: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One LoKr module re-expressed exactly as w1 = [[1]] and w2 (low-rank when LyCORIS keeps it so)."""
    a, b, kernel = _factors(group)  # (l, m), (k, n*kh*kw)
    scale = _scale(group)
    out_dim, flat_in = a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]
    kernel_size = int(torch.tensor(kernel).prod()) if kernel else 1
    in_dim = flat_in // kernel_size
    a_o, a_i = _split(a)
    b_o, b_i = _split(b)
    rank = a_o.shape[1] * b_o.shape[1]
    dtype = group["lokr_w1"].dtype if "lokr_w1" in group else group["lokr_w1_a"].dtype
    one = torch.ones(1, 1, dtype=dtype)
    if rank < max(out_dim, in_dim) / 2:
        w2_a = (torch.kron(a_o, b_o) * scale).to(dtype)  # (out, r)
        w2_b = torch.kron(a_i, b_i).to(dtype)  # (r, in*kh*kw)
        return {"lokr_w1": one, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b, "alpha": torch.tensor(float(rank))}
    whole = (torch.kron(a, b) * scale).to(dtype).reshape(out_dim, in_dim, *kernel)
    return {"lokr_w1": one, "lokr_w2": whole, "alpha": torch.tensor(1.0)}


def to_lycoris_readable(kohya: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """kohya/LyCORIS tensors -> the same adapter with every LoKr module LyCORIS cannot rebuild rewritten
    by `as_factor_one` (other methods and rebuildable modules unchanged); also the rewritten module names."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in kohya.items():
        module, _, param = key.partition(".")
        groups[module][param] = value
    out: dict[str, torch.Tensor] = {}
    rewritten = []
    for module, group in groups.items():
        if any(param.startswith("lokr_") for param in group) and not rebuilds_in_lycoris(group):
            kept = {p: v for p, v in group.items() if not p.startswith("lokr_") and p != "alpha"}
            group = {**kept, **as_factor_one(group)}
            rewritten.append(module)
        out.update({f"{module}.{param}": value for param, value in group.items()})
    return out, rewritten
