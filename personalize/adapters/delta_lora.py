"""Delta-LoRA (Zi et al., arXiv 2309.02411): the frozen weight also moves by the change of B A.

    W_{t+1} = W_t + lambda * s * (B_{t+1} A_{t+1} - B_t A_t),    y = W_t x + s B_t A_t x

With the update running from step 0 (B_0 = 0) this sums to W_t = W_0 + lambda s B_t A_t, so the model
is W_0 + (1 + lambda) s B A, while the gradients of A and B are those of plain LoRA with scale s (W_t is
not differentiated). We train it in exactly that form, without writing W every step (which a 4-bit
base could not take):

    y = W_0 x + s B A x + lambda s (B A x).detach()

so the saved adapter IS a LoRA with alpha' = (1 + lambda) alpha (any LoRA reader, peft included, loads
it). The paper drops dropout on the LoRA branch; `dropout` must be 0.
"""

from __future__ import annotations

import torch
from torch import nn

from personalize.adapters.lora import LoRA
from personalize.errors import UserError


class DeltaLoRA(LoRA):
    def __init__(
        self, base_layer: nn.Module, rank: int = 4, alpha: float | None = None, update_ratio: float = 0.5
    ) -> None:
        if update_ratio < 0:
            raise UserError(f"delta-lora: update_ratio (lambda) must be >= 0 (got {update_ratio})")
        super().__init__(base_layer, rank=rank, alpha=float(rank if alpha is None else alpha) * (1 + update_ratio))
        self.method = "lora"  # what it saves as
        self.update_ratio = update_ratio

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        lora = self.lora_output(x) * (scale * self.scaling)  # (1 + lambda) s B A x
        trained = 1.0 / (1.0 + self.update_ratio)  # the share that gradients flow through: s B A x
        return lora * trained + lora.detach() * (1.0 - trained)
