"""LLaMA-Adapter (Zhang et al., arXiv 2303.16199): zero-init gated adaption prompts in the top layers.

In each of the top `adapter_layers` attention layers, a learnable prompt P_l (adapter_len, D) is
projected by the layer's own k/v projections, and every query attends to it on its own:

    out_l = Attn_l(x) + W_o ( g_l * softmax(Q_l K_p^T / sqrt(d)) V_p ),   K_p = W_k P_l,  V_p = W_v P_l

Q_l are the layer's rotary-embedded queries; K_p carries no position. The gate g_l starts at 0, so
the model is unchanged at step 0 (the paper's "zero-init attention"); softmax is over the prompt only
and in fp32, as peft's adaption_prompt. P_l starts N(0, 1). Works on any model whose attention
modules have q_proj/k_proj/v_proj/o_proj and take `position_embeddings` (Llama, Mistral, Qwen2, the
language model of LLaVA). State dict keys are peft's: "<attention path>.adaption_prompt" (1, n, D)
and "<attention path>.adaption_gate" (1,).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from personalize.errors import UserError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_paths(model: nn.Module) -> list[str]:
    """Llama-style self-attention modules of the language model, bottom to top."""
    found = [
        path
        for path, module in model.named_modules()
        if path.endswith("self_attn") and all(hasattr(module, name) for name in PROJECTIONS) and "vision" not in path
    ]
    return sorted(found, key=lambda path: [int(n) if n.isdigit() else n for n in re.split(r"\.", path)])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAdapter(nn.Module):
    method: ClassVar[str] = "llama-adapter"
    any_model: ClassVar[bool] = True  # a VLM's language model takes it too (no input tokens are added)

    def __init__(self, model: nn.Module, adapter_len: int = 10, adapter_layers: int | None = None) -> None:
        super().__init__()
        paths = attention_paths(model)
        if not paths:
            raise UserError(
                f"llama-adapter needs self-attention layers with {'/'.join(PROJECTIONS)} (Llama-style); "
                f"{type(model).__name__} has none"
            )
        layers = len(paths) if adapter_layers is None else adapter_layers
        if adapter_len < 1 or not 1 <= layers <= len(paths):
            raise UserError(
                f"llama-adapter: adapter_len >= 1 and 1 <= adapter_layers <= {len(paths)} "
                f"(got {adapter_len}, {adapter_layers})"
            )
        self.paths = paths[-layers:]
        self.adapter_len = adapter_len
        self.prompts = nn.ParameterList()
        self.gates = nn.ParameterList()
        self.handles = []
        for path in self.paths:
            attention = model.get_submodule(path)
            weight = attention.q_proj.weight
            hidden = attention.q_proj.in_features
            self.prompts.append(nn.Parameter(torch.randn(1, adapter_len, hidden, device=weight.device)))
            self.gates.append(nn.Parameter(torch.zeros(1, device=weight.device)))
            self.handles.append(
                attention.register_forward_hook(self._attention_hook(len(self.gates) - 1), with_kwargs=True)
            )
        self.__dict__["model"] = model

    def _attention_hook(self, index: int) -> Any:
        def hook(attention: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            scales = self.__dict__["model"].__dict__.get("_personalize_prompt_scales", {})
            if not any(scale != 0 for scale in scales.values()):
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            added = self.prompt_attention(attention, hidden, kwargs["position_embeddings"], index)
            first = output[0] if isinstance(output, tuple) else output
            result = (first + added).to(first.dtype)
            return (result, *output[1:]) if isinstance(output, tuple) else result

        return hook

    def prompt_attention(
        self, attention: nn.Module, hidden: torch.Tensor, position: tuple[torch.Tensor, torch.Tensor], index: int
    ) -> torch.Tensor:
        """W_o (g softmax(Q K_p^T / sqrt(d)) V_p) for one layer, (B, T, D)."""
        batch, length, _ = hidden.shape
        config = attention.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = attention.head_dim
        query = attention.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        cos, sin = (p.unsqueeze(1) for p in position)  # (B, 1, T, d)
        query = query * cos + _rotate_half(query) * sin
        prompt = self.prompts[index]  # (1, n, D)
        n = self.adapter_len
        key = attention.k_proj(prompt.to(hidden.dtype)).view(1, n, kv_heads, head_dim).transpose(1, 2)  # (1, kvH, n, d)
        value = attention.v_proj(prompt.to(hidden.dtype)).view(1, n, kv_heads, head_dim).transpose(1, 2)
        key = key.repeat_interleave(heads // kv_heads, dim=1)  # (1, H, n, d)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        scores = query @ key.transpose(2, 3).to(query.dtype) / math.sqrt(head_dim)  # (B, H, T, n)
        weights = self.gates[index] * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        mixed = (weights @ value.to(weights.dtype)).transpose(1, 2).reshape(batch, length, heads * head_dim)
        return attention.o_proj(mixed.to(hidden.dtype))  # (B, T, D)

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs  # nothing is added to the input: the work happens in the attention hooks

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, prompt, gate in zip(self.paths, self.prompts, self.gates):
            out[f"{path}.adaption_prompt"] = prompt.detach()
            out[f"{path}.adaption_gate"] = gate.detach()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for path, prompt, gate in zip(self.paths, self.prompts, self.gates):
                prompt.copy_(tensors[f"{path}.adaption_prompt"])
                gate.copy_(tensors[f"{path}.adaption_gate"])

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()
