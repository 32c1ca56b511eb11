"""VeRA: vector-based random matrix adaptation (Kopiczko et al., arXiv 2310.11454).

One pair of frozen random matrices is shared by every adapted layer; each layer trains two vectors:

    y = W x + s * Lambda_b B Lambda_d A x,   A (r, in_max), B (out_max, r) frozen, sliced to the layer:
                                             A[:, :in], B[:out, :];  Lambda_d = diag(d) (r,), Lambda_b = diag(b) (out,)

b starts at 0 (the model is unchanged at step 0), d at `d_initial` (0.1, the paper's and peft's default).
A and B are kaiming-uniform draws from a CPU generator seeded with `seed`, A first, as peft draws its
`vera_A` / `vera_B` from `projection_prng_key`, so the same seed and shapes give the same matrices. Per
layer the trained parameters are `vera_lambda_b`, `vera_lambda_d` (peft's names); the layer's slices of the
shared matrices are kept as `vera_A` / `vera_B` buffers that are views of one shared tensor in memory
(the peft file stores them once, as `base_model.vera_A` / `vera_B`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, base_weight_shape, check_positive, layer_kind
from personalize.errors import UserError


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (peft's VeRA init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(layers: Sequence[nn.Module], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, max in) and B (max out, r) for all `layers`, drawn from `seed` on the CPU."""
    shapes = [base_weight_shape(layer) for layer in layers]
    if any(layer_kind(layer) != "linear" for layer in layers):
        raise UserError("vera wraps Linear layers only (as peft's VeRA); choose targets without convolutions")
    out_max = max(shape[0] for shape in shapes)
    in_max = max(shape[1] for shape in shapes)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_uniform((rank, in_max), generator)
    b = kaiming_uniform((out_max, rank), generator)
    return a, b


class VeRA(AdapterModule):
    method = "vera"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int = 256,
        d_initial: float = 0.1,
        seed: int = 0,
        projections: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_positive("vera", rank=rank)
        if layer_kind(base_layer) != "linear":
            raise UserError("vera wraps Linear layers only (as peft's VeRA)")
        out_features, in_features = base_weight_shape(base_layer)
        a, b = projections if projections is not None else shared_projections([base_layer], rank, seed)
        if a.shape[0] != rank or a.shape[1] < in_features or b.shape[0] < out_features:
            raise UserError(
                f"vera: shared matrices A {tuple(a.shape)} / B {tuple(b.shape)} do not cover this layer "
                f"({out_features} x {in_features}, rank {rank})"
            )
        device = base_layer.weight.device
        self.register_buffer("vera_A", a.to(device)[:, :in_features])  # a view: one shared tensor for all layers
        self.register_buffer("vera_B", b.to(device)[:out_features, :])
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=device))
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), device=device))
        self.rank = rank
        self._register_load_state_dict_pre_hook(self._cut_projections)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # Own copies in a state dict: safetensors refuses tensors that share memory (the views above).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("vera_A", "vera_B"):
            destination[prefix + name] = destination[prefix + name].clone()

    def _cut_projections(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """A file may hold the whole shared matrices (peft stores them once): keep this layer's slices."""
        for name in ("vera_A", "vera_B"):
            key = prefix + name
            if key in state_dict:
                rows, cols = getattr(self, name).shape
                state_dict[key] = state_dict[key][:rows, :cols]

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        x = x.to(self.vera_lambda_d.dtype)
        hidden = self.vera_lambda_d * (x @ self.vera_A.T)  # (..., r)
        return scale * self.vera_lambda_b * (hidden @ self.vera_B.T)  # (..., out)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        b = self.vera_lambda_b[:, None] * self.vera_B  # (out, r)
        return b @ (self.vera_lambda_d[:, None] * self.vera_A)  # (out, in)

    @staticmethod
    def hyper_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        a, b = tensors["vera_A"], tensors["vera_B"]
        return {"rank": int(a.shape[0]), "projections": (a.float(), b.float())}
