"""One layer of a merge: the inputs' parameters there -> the merged LoRA factors (or full delta) and its error.

A LoRA input enters as its factors (A_i, B_i, s_i); any other method (LoHa, LoKr, KronA, DoRA, IA3) as its
full weight delta, computed on the base layer by the injection core. Factor-space methods need every input
to be a plain LoRA of one rank; otherwise the same method runs on the full deltas and the result is
compressed to the rank by SVD.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from personalize.adapters import merge_ops as ops
from personalize.errors import UserError
from personalize.formats.canonical import alpha_of, method_of


@dataclass
class Term:
    """One input at one layer: LoRA factors (down, up) with scale s = alpha / r, or a full flat delta; weight w."""

    weight: float
    scale: float = 1.0
    down: torch.Tensor | None = None  # (r, in[, kh, kw])
    up: torch.Tensor | None = None  # (out, r[, 1, 1])
    delta: torch.Tensor | None = None  # (out, in*kh*kw), scale included

    @property
    def is_lora(self) -> bool:
        return self.down is not None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    @property
    def coefficient(self) -> float:
        """w * s: what multiplies B A in the weighted sum."""
        return self.weight * self.scale

    def flat(self) -> torch.Tensor:
        """The input's own delta dW (out, in*kh*kw), unweighted: s B A or the stored delta."""
        if self.down is not None and self.up is not None:
            return ops.flat_delta(self.down, self.up) * self.scale
        assert self.delta is not None
        return self.delta


@dataclass
class Merged:
    down: torch.Tensor | None  # merged LoRA (r, in[, kh, kw]); None for a full-delta result
    up: torch.Tensor | None
    delta: torch.Tensor | None  # (out, in*kh*kw) when the result is kept full (--into-base)
    error: float  # relative to the exact weighted delta sum_i w_i dW_i
    norm: float = 0.0  # ||sum_i w_i dW_i||_F (weights the overall error)


def term_of(group: Mapping[str, torch.Tensor], weight: float, base_layer: nn.Module | None, where: str) -> Term:
    """A LoRA stays factored (down, up scaled by alpha / r into `coefficient`); anything else is expanded."""
    method = method_of(group)
    if method == "lora":
        down, up = group["lora_down.weight"].float(), group["lora_up.weight"].float()
        scale = (alpha_of(group) or down.shape[0]) / down.shape[0]
        return Term(weight, scale, down=down, up=up)
    if base_layer is None:
        raise UserError(
            f"{where} is {method}, whose weight delta depends on the layer's shape or weights; "
            "pass the base model with --base to expand it"
        )
    from personalize.formats.svd import module_delta

    delta = module_delta(group, base_layer)
    if isinstance(base_layer, nn.Embedding):
        delta = delta.T  # factors of an Embedding LoRA are (dim, r) and (r, num)
    return Term(weight, delta=delta.flatten(1))


class Exact:
    """The exact weighted delta sum_i w_i dW_i of one layer, built only as far as asked (cached)."""

    def __init__(self, terms: list[Term]) -> None:
        self.terms = terms
        self.loras = all(t.is_lora for t in terms)
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._delta: torch.Tensor | None = None
        self._norm: float | None = None

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(left (out, K), right (K, in)), left @ right = the exact delta (all terms LoRAs)."""
        if self._factors is None:
            left = torch.cat([t.up.flatten(1) for t in self.terms], dim=1)  # type: ignore[union-attr]
            right = torch.cat([t.down.flatten(1) * t.coefficient for t in self.terms], dim=0)  # type: ignore[union-attr]
            self._factors = left, right
        return self._factors

    @property
    def delta(self) -> torch.Tensor:
        if self._delta is None:
            self._delta = exact_delta(self.terms)
        return self._delta

    @property
    def norm(self) -> float:
        if self._norm is None:
            self._norm = ops.product_norm(*self.factors) if self.loras else float(self.delta.norm())
        return self._norm

    def error_of(self, down: torch.Tensor, up: torch.Tensor) -> float:
        """||B A - exact||_F / ||exact||_F for merged factors (down, up)."""
        if self.loras:
            return ops.factored_distance(down, up, *self.factors, self.norm) / self.norm if self.norm > 0 else 0.0
        return ops.relative_error(ops.flat_delta(down, up), self.delta)


def exact_delta(terms: list[Term]) -> torch.Tensor:
    return sum(t.flat() * t.weight for t in terms)  # type: ignore[return-value]


def _shape_factors(
    down: torch.Tensor, up: torch.Tensor, like: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (r, in*k), (out, r) -> the layout of `like` (a LoRA down of the layer) when it is a conv."""
    if like is not None and like.dim() == 4:
        return down.reshape(down.shape[0], *like.shape[1:]), up.reshape(*up.shape, 1, 1)
    return down, up


def merge_layer(
    terms: list[Term],
    method: str,
    rank: int | None,
    density: float,
    generator: torch.Generator | None,
    full: bool,
    conv_like: torch.Tensor | None = None,
) -> Merged:
    """Merge one layer's terms. `rank` None keeps factor-space methods at the inputs' rank (svd: the
    largest input rank); `full` returns the full delta (for --into-base) instead of LoRA factors."""
    exact = Exact(terms)
    like = conv_like if conv_like is not None else next((t.down for t in terms if t.down is not None), None)
    weights = [t.weight for t in terms]
    if full:  # task-vector definitions on the full deltas; exact for linear / cat / svd
        kind = "linear" if method in ("cat", "svd") else method
        delta = ops.combine(_flat_stack(terms), weights, kind, density, generator)
        return Merged(None, None, delta, ops.relative_error(delta, exact.delta), exact.norm)
    if method == "cat":
        down, up = _cat(terms, like)
        error = 0.0 if exact.loras else ops.relative_error(ops.flat_delta(down, up), exact.delta)
        return Merged(down, up, None, error, exact.norm)
    target = rank or max((t.rank for t in terms), default=0)
    if not target:
        raise UserError("none of the inputs is a LoRA here, so there is no rank to keep; pass --rank R")
    if method == "svd" or (method == "linear" and not exact.loras):
        if exact.loras:
            down, up, singular = ops.svd_of_product(*exact.factors, target)
        else:
            down, up, singular = ops.svd_of_delta(exact.delta, target)
        down, up = _shape_factors(down, up, like)
        return Merged(down, up, None, ops.tail_error(singular, target), float(singular.norm()))
    if method in ("linear", *ops.SPARSE_METHODS):
        if exact.loras and rank is None:
            downs, ups = [t.down for t in terms], [t.up for t in terms]
            coefficients = [t.coefficient for t in terms]
            down, up = ops.combine_factors(downs, ups, coefficients, method, density, generator)  # type: ignore[arg-type]
            return Merged(down, up, None, exact.error_of(down, up), exact.norm)
        combined = ops.combine(_flat_stack(terms), weights, method, density, generator)
        down, up, _ = ops.svd_of_delta(combined, target)
        error = exact.error_of(down, up)
        down, up = _shape_factors(down, up, like)
        return Merged(down, up, None, error, exact.norm)
    raise UserError(f"unknown merge method '{method}'; choose one of {', '.join(ops.METHODS)}")


def _flat_stack(terms: list[Term]) -> torch.Tensor:
    """Every term's flat delta in one (n, out, in*k) tensor, filled one delta at a time (never a list of
    deltas and their stack at once: half the peak for full-delta merges)."""
    first = terms[0].flat()
    stacked = torch.empty((len(terms), *first.shape), dtype=first.dtype)
    stacked[0] = first
    del first
    for index, term in enumerate(terms[1:], start=1):
        stacked[index] = term.flat()
    return stacked


def _cat(terms: list[Term], like: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated ranks; a full delta (LoHa, LoKr, ...) joins at its numerical rank, exactly."""
    downs, ups = [], []
    for t in terms:
        if t.down is not None and t.up is not None:
            downs.append(t.down * t.coefficient)
            ups.append(t.up)
            continue
        d, u, s = ops.svd_of_delta(t.flat() * t.weight, rank=10**9)
        keep = max(1, int((s > s[0] * 1e-6).sum())) if s.numel() and s[0] > 0 else 1
        d, u = _shape_factors(d[:keep], u[:, :keep], like)
        downs.append(d)
        ups.append(u)
    return torch.cat(downs, 0), torch.cat(ups, 1)


def overall_error(errors: Mapping[str, float], norms: Mapping[str, float]) -> float:
    """sqrt(sum_l err_l^2 ||dW_l||^2 / sum_l ||dW_l||^2): the error of the whole adapter."""
    total = sum(n**2 for n in norms.values())
    residual = sum((errors[k] * norms[k]) ** 2 for k in errors)
    return math.sqrt(residual / total) if total > 0 else 0.0
