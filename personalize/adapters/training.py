"""What some methods need from a training loop beyond forward and backward.

- `regularization(model)`: a loss term to add (AdaLoRA's and IncreLoRA's orthogonality penalty), or None.
- `calibrate(model, loss_of, batches)`: before training, FISH mask / Child-Tuning_D pick their entries.
- `finish(model)`: after training, Diff-Pruning projects onto its density.
- `follow_optimizer(model, optimizer)`: after every optimizer step, the methods' own step (AdaLoRA's
  rank allocation, IncreLoRA's rank growth), counted from 1; returns the hook's handle.

Any loop works: `loss = model(**batch).loss + (regularization(model) or 0)`; the hook fires inside
`optimizer.step()`, before `zero_grad`, so the gradients are still there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from personalize.adapters import adalora, increlora, sparse
from personalize.adapters.layer import AdapterLayer

# method -> (regularization(modules), after_step(modules, step))
STEPPED: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., None]]] = {
    "adalora": (adalora.regularization, adalora.after_step),
    "increlora": (increlora.regularization, increlora.after_step),
    "diff-pruning": (sparse.regularization, sparse.after_step),
}
CALIBRATED = sparse.FISHER_METHODS  # need `calibrate` before training (Fisher information)


def _groups(model: nn.Module, methods: tuple[str, ...] = tuple(STEPPED)) -> dict[tuple[str, str], list[nn.Module]]:
    """(adapter name, method) -> its modules, for `methods`."""
    groups: dict[tuple[str, str], list[nn.Module]] = {}
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for name, adapter in module.adapters.items():
                if adapter.method in methods and name not in module.merged:
                    groups.setdefault((name, adapter.method), []).append(adapter)
    return groups


def regularization(model: nn.Module) -> torch.Tensor | None:
    terms = [STEPPED[method][0](modules) for (_, method), modules in _groups(model).items()]
    return torch.stack(terms).sum() if terms else None


def follow_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """Run each method's after-step once per `optimizer.step()`; None when no method needs one."""
    if not _groups(model):
        return None
    counter = {"step": 0}

    def hook(*_: Any) -> None:
        counter["step"] += 1
        for (_, method), modules in _groups(model).items():
            STEPPED[method][1](modules, counter["step"])

    return optimizer.register_step_post_hook(hook)


def calibrate(model: nn.Module, loss_of: Callable[[dict], torch.Tensor], batches: Iterable[dict]) -> bool:
    """FISH mask / Child-Tuning_D: choose the trained entries from the Fisher information over `batches`
    (loss_of(batch) -> loss). Returns whether any adapter needed it."""
    groups = [
        modules
        for modules in _groups(model, CALIBRATED).values()
        if all(getattr(m, "mode", "d") == "d" for m in modules)
    ]
    batches = list(batches)
    for modules in groups:
        sparse.calibrate(modules, loss_of, batches)
    return bool(groups)


def finish(model: nn.Module) -> None:
    """After the last step: Diff-Pruning keeps its top-density entries."""
    for modules in _groups(model, ("diff-pruning",)).values():
        sparse.finalize(modules)
