"""Exponential moving average of the trainable weights (Polyak averaging).

shadow <- d * shadow + (1 - d) * param after every optimizer step, with the warm-up decay
d_n = min(decay, (1 + n) / (10 + n)) so that early, still-random weights fade quickly.
Validation and the saved outputs use the shadow weights when EMA is on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def warmup_decay(decay: float, update: int) -> float:
    """min(decay, (1 + n) / (10 + n)) for the n-th update (n = 0, 1, ...)."""
    return min(decay, (1 + update) / (10 + update))


@torch.no_grad()
def ema_update_(shadow: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * param, in place."""
    for average, param in zip(shadow, params):
        average.lerp_(param.detach().to(average.dtype), 1.0 - decay)


class EMA:
    """Shadow copies (fp32) of a list of parameters; `swap()` puts them in place temporarily."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float = 0.999) -> None:
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [param.detach().float().clone() for param in self.params]

    def update(self) -> None:
        ema_update_(self.shadow, self.params, warmup_decay(self.decay, self.updates))
        self.updates += 1

    @contextmanager
    def swap(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the parameters (for sampling or saving)."""
        saved = [param.detach().clone() for param in self.params]
        with torch.no_grad():
            for param, average in zip(self.params, self.shadow):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, original in zip(self.params, saved):
                    param.copy_(original)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"shadow.{index}": tensor for index, tensor in enumerate(self.shadow)}
        state["updates"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len([key for key in state if key.startswith("shadow.")]) != len(self.shadow):
            raise ValueError("EMA state does not match the trainable parameters")
        for index, tensor in enumerate(self.shadow):
            tensor.copy_(state[f"shadow.{index}"])
        self.updates = int(state["updates"])
