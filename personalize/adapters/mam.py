"""MAM adapter (He et al., ICLR 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
arXiv 2110.04366): prefix tuning on attention plus a scaled parallel adapter on every feed-forward block.

    attention:  keys/values of every layer get `num_virtual_tokens` trained prefixes (as `prefix-tuning`)
    FFN:        h = FFN(x) + s * W_up ReLU(W_down x)     W_down (m, D), W_up (D, m) zero-init, s = `scale` (4)

The paper's 7B-scale choice is a small prefix (l = 30) and a large FFN adapter (m = 512, s = 4); here
m = D / `reduction` (8). The parallel adapter reads the FFN's input x (a forward hook on each `mlp`),
so it runs beside the FFN, not after it. Causal LMs only (the prefix lives in the cache).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters.llama_adapter import attention_paths
from personalize.errors import UserError


class MAM(nn.Module):
    method: ClassVar[str] = "mam"

    def __init__(self, model: nn.Module, num_virtual_tokens: int = 30, reduction: int = 8, scale: float = 4.0):
        super().__init__()
        from personalize.adapters.prompt import PrefixTuning

        blocks = [path.rsplit(".", 1)[0] + ".mlp" for path in attention_paths(model)]
        blocks = [path for path in blocks if _has(model, path)]
        if not blocks:
            raise UserError(
                f"mam needs Llama-style decoder layers (self_attn and mlp); {type(model).__name__} has none"
            )
        if reduction < 1:
            raise UserError(f"mam: reduction must be at least 1 (got {reduction})")
        self.prefix = PrefixTuning(model, num_virtual_tokens)
        self.num_virtual_tokens = num_virtual_tokens
        hidden = model.get_submodule(blocks[0]).down_proj.out_features
        device = next(model.parameters()).device
        self.blocks, self.scale = blocks, scale
        self.down = nn.ModuleList(nn.Linear(hidden, max(1, hidden // reduction), device=device) for _ in blocks)
        self.up = nn.ModuleList(nn.Linear(max(1, hidden // reduction), hidden, device=device) for _ in blocks)
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.__dict__["model"] = model
        self.handles = [
            model.get_submodule(path).register_forward_hook(self._ffn_hook(i)) for i, path in enumerate(blocks)
        ]

    def _ffn_hook(self, index: int) -> Any:
        def add(mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            scales = self.__dict__["model"].__dict__.get("_personalize_prompt_scales", {})
            if not any(value != 0 for value in scales.values()):
                return None
            x = args[0].to(self.down[index].weight.dtype)  # the FFN's input (..., D)
            return output + (self.scale * self.up[index](F.relu(self.down[index](x)))).to(output.dtype)

        return add

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.prefix.hook(model, kwargs)  # the prefixes go in the cache before the first token

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeddings": self.prefix.prompt_embeddings.detach()}
        for path, down, up in zip(self.blocks, self.down, self.up):
            for name, layer in (("adapter_down", down), ("adapter_up", up)):
                out[f"{path}.{name}.weight"] = layer.weight.detach()
                out[f"{path}.{name}.bias"] = layer.bias.detach()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prefix.prompt_embeddings.copy_(tensors["prompt_embeddings"])
            for path, down, up in zip(self.blocks, self.down, self.up):
                for name, layer in (("adapter_down", down), ("adapter_up", up)):
                    layer.weight.copy_(tensors[f"{path}.{name}.weight"])
                    layer.bias.copy_(tensors[f"{path}.{name}.bias"])

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()


def _has(model: nn.Module, path: str) -> bool:
    try:
        return hasattr(model.get_submodule(path), "down_proj")
    except AttributeError:
        return False
