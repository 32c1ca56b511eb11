"""Meta-device traces of forwards whose shapes depend on mask values (the planner's trace of Qwen-Image 2.1).

On the meta device a tensor has a shape and no values, so an op whose output shape depends on values
(`repeat_interleave` by a tensor of counts, boolean indexing, `int(mask.sum())`) cannot be traced there.
The masks that decide those shapes are small integer inputs: the planner gives them real values on the CPU
while every floating tensor stays on meta. Under `ConcreteIndices` an op that takes such a CPU tensor as its
index or repeat counts keeps it concrete (the meta kernels take CPU indices), and every other op that mixes
the two devices sees the CPU tensors moved to meta, so the floating result is a meta tensor as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

# ops whose index / repeat argument decides the output shape: a CPU tensor there stays concrete
INDEX_OPS = {
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.index_select,
    torch.index_select,
    torch.Tensor.repeat_interleave,
    torch.repeat_interleave,
}


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value


class ConcreteIndices(TorchFunctionMode):
    """Meta floats, concrete CPU masks: see the module docstring."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        mixed = any(t.is_meta for t in tensors) and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors)
        if mixed and func not in INDEX_OPS:
            args, kwargs = tree_map(_to_meta, (args, kwargs))
        return func(*args, **kwargs)
