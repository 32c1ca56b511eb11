"""AdapterFusion (Pfeiffer et al., EACL 2021, arXiv 2005.00247): attention over trained task adapters.

On each layer that holds the task adapters a_1 .. a_N (bottleneck adapters, frozen), with h the
sublayer's output and o_n = h + a_n(h) each adapter's output:

    alpha = softmax_n( (h W_Q) . (o_n W_K) / T ),     h' = sum_n alpha_n (o_n W_V)

Only W_Q, W_K, W_V (D x D each, with biases) train; W_V starts at the identity and W_Q, W_K near zero,
so at step 0 the layer outputs the average of the task adapters' outputs. While fused, the task
adapters are switched off as plain adapters (scale 0) and frozen: the fusion layer calls them itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from personalize.adapters.base import AdapterModule, check_positive, layer_kind
from personalize.errors import UserError


class Fusion(AdapterModule):
    method = "fusion"

    def __init__(self, base_layer: nn.Module, adapters: Sequence[str] = (), temperature: float = 1.0) -> None:
        super().__init__()
        check_positive("fusion", temperature=temperature)
        if len(adapters) < 2:
            raise UserError("fusion needs the names of at least two trained task adapters (adapters=[...])")
        if layer_kind(base_layer) != "linear":
            raise UserError(
                f"fusion goes where bottleneck adapters are (Linear outputs), not {type(base_layer).__name__}"
            )
        dim, device = base_layer.out_features, base_layer.weight.device
        self.names, self.temperature = list(adapters), temperature
        self.query = nn.Linear(dim, dim, device=device)
        self.key = nn.Linear(dim, dim, device=device)
        self.value = nn.Linear(dim, dim, device=device)
        with torch.no_grad():
            for layer in (self.query, self.key):
                layer.weight.normal_(0.0, 0.02)
                layer.bias.zero_()
            self.value.weight.copy_(torch.eye(dim))
            self.value.bias.zero_()
        self.__dict__["siblings"] = []

    @staticmethod
    def default_targets(model: nn.Module, adapters: Sequence[str] = (), **_: object) -> list[str]:
        """The layers holding the first task adapter (every task must be there too: checked on inject)."""
        from personalize.adapters.layer import AdapterLayer

        first = adapters[0] if adapters else ""
        paths = [p for p, m in model.named_modules() if isinstance(m, AdapterLayer) and first in m.adapters]
        if not paths:
            raise UserError(
                f"fusion: no layer holds the task adapter {first!r}; inject and train the task adapters first"
            )
        return paths

    @staticmethod
    def after_inject(model: nn.Module, paths: Sequence[str], name: str) -> None:
        """Find each layer's task adapters, freeze them and take them out of the plain sum."""
        for path in paths:
            layer = model.get_submodule(path)
            fusion = layer.adapters[name]
            missing = [n for n in fusion.names if n not in layer.adapters]
            if missing:
                raise UserError(
                    f"fusion: {path} has no adapter {missing[0]!r}; inject and train the task adapters first"
                )
            fusion.__dict__["siblings"] = [layer.adapters[n] for n in fusion.names]
            for task in fusion.names:
                layer.scales[task] = 0.0
                layer.adapters[task].requires_grad_(False)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module, scale: float) -> torch.Tensor:
        h = base_out.to(self.query.weight.dtype)  # (..., D)
        outputs = torch.stack(
            [h + task.delta(x, h, base_layer, 1.0) for task in self.__dict__["siblings"]]
        )  # (N, ..., D)
        scores = (self.query(h).unsqueeze(0) * self.key(outputs)).sum(-1) / self.temperature  # (N, ...)
        weights = scores.softmax(dim=0).unsqueeze(-1)  # (N, ..., 1)
        fused = (weights * self.value(outputs)).sum(0)  # (..., D)
        return scale * (fused - h)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise UserError("AdapterFusion is non-linear: it cannot be merged into the weights")
