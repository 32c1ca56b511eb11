"""UniPELT (Mao et al., ACL 2022, arXiv 2110.07577): LoRA, prefix tuning and an adapter in every layer,
each behind a learned gate that decides how much of it the layer uses.

In layer l, with x the attention input and h the feed-forward output:

    LoRA (q_proj, v_proj):   Q = W_q x + G_L * s * B_q A_q x,   V likewise,   G_L = sigmoid(W_GL x)  per token
    prefix:                  keys/values [G_P * P_K; K], [G_P * P_V; V],        G_P = sigmoid(W_GP mean_t x)
    adapter (after the FFN): h' = h + G_A * W_up ReLU(W_down h),               G_A = sigmoid(W_GA h)  per token

The paper applies G_P to the prefix vectors; it computes every gate from the submodule's input, and so
do we, with the prefix gate from the mean over the sequence's tokens (one gate per sequence and layer,
fixed after the first forward pass of a generation). LoRA B and the adapter's W_up start at zero, and
the prefixes as in `prefix-tuning` (the frozen model's keys/values of random tokens). Causal LMs only.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters.llama_adapter import attention_paths
from personalize.errors import UserError


class UniPELT(nn.Module):
    method: ClassVar[str] = "unipelt"

    def __init__(
        self, model: nn.Module, num_virtual_tokens: int = 10, rank: int = 8, alpha: float = 16.0, reduction: int = 16
    ) -> None:
        super().__init__()
        from personalize.adapters.prompt import PrefixTuning

        attentions = attention_paths(model)
        mlps = [path.rsplit(".", 1)[0] + ".mlp" for path in attentions]
        if not attentions or not all(hasattr(model.get_submodule(p), "down_proj") for p in mlps):
            raise UserError(
                f"unipelt needs Llama-style decoder layers (self_attn and mlp); {type(model).__name__} has none"
            )
        if rank < 1 or reduction < 1:
            raise UserError(f"unipelt: rank and reduction must be at least 1 (got {rank}, {reduction})")
        self.prefix = PrefixTuning(model, num_virtual_tokens)
        self.num_virtual_tokens = num_virtual_tokens
        first = model.get_submodule(attentions[0])
        dim, device = first.q_proj.in_features, first.q_proj.weight.device
        q_out, v_out = first.q_proj.out_features, first.v_proj.out_features
        layers = len(attentions)

        def linears(n_in: int, n_out: int, zero: bool = False, bias: bool = False) -> nn.ModuleList:
            made = nn.ModuleList(nn.Linear(n_in, n_out, bias=bias, device=device) for _ in range(layers))
            if zero:
                for layer in made:
                    nn.init.zeros_(layer.weight)
            return made

        self.q_down, self.q_up = linears(dim, rank), linears(rank, q_out, zero=True)  # A_q, B_q
        self.v_down, self.v_up = linears(dim, rank), linears(rank, v_out, zero=True)  # A_v, B_v
        for down in (*self.q_down, *self.v_down):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        size = max(1, dim // reduction)
        self.adapter_down, self.adapter_up = linears(dim, size, bias=True), linears(size, dim, zero=True, bias=True)
        for up in self.adapter_up:
            nn.init.zeros_(up.bias)
        self.gate_lora, self.gate_prefix, self.gate_adapter = (linears(dim, 1, bias=True) for _ in range(3))
        self.scaling = alpha / rank
        self.attentions, self.mlps = attentions, mlps
        self._lora_gate: list[torch.Tensor | None] = [None] * layers
        self.__dict__["model"] = model
        self.handles = []
        for index, (attention_path, mlp_path) in enumerate(zip(attentions, mlps)):
            attention = model.get_submodule(attention_path)
            self.handles.append(attention.register_forward_pre_hook(self._attention_hook(index), with_kwargs=True))
            self.handles.append(attention.q_proj.register_forward_hook(self._lora_hook(index, "q")))
            self.handles.append(attention.v_proj.register_forward_hook(self._lora_hook(index, "v")))
            self.handles.append(model.get_submodule(mlp_path).register_forward_hook(self._adapter_hook(index)))

    def _on(self) -> bool:
        scales = self.__dict__["model"].__dict__.get("_personalize_prompt_scales", {})
        return any(scale != 0 for scale in scales.values())

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.prefix.hook(model, kwargs)  # prefixes in the cache (ungated), the mask extended

    def _attention_hook(self, index: int) -> Any:
        def gate(attention: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if not self._on():
                return
            x = (args[0] if args else kwargs["hidden_states"]).to(self.gate_lora[index].weight.dtype)  # (B, T, D)
            self._lora_gate[index] = torch.sigmoid(self.gate_lora[index](x))  # G_L (B, T, 1)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            layer = cache.layers[index] if cache is not None and hasattr(cache, "layers") else None
            n = self.num_virtual_tokens
            if layer is not None and layer.keys is not None and layer.keys.shape[-2] == n:  # only the prefixes
                g = torch.sigmoid(self.gate_prefix[index](x.mean(dim=1)))[:, :, None, None]  # G_P (B, 1, 1, 1)
                layer.keys = layer.keys * g.to(layer.keys.dtype)
                layer.values = layer.values * g.to(layer.values.dtype)

        return gate

    def _lora_hook(self, index: int, which: str) -> Any:
        def add(projection: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            gate = self._lora_gate[index]
            if gate is None or not self._on():
                return None
            down, up = (self.q_down, self.q_up) if which == "q" else (self.v_down, self.v_up)
            x = args[0].to(down[index].weight.dtype)
            return output + (gate * self.scaling * up[index](down[index](x))).to(output.dtype)

        return add

    def _adapter_hook(self, index: int) -> Any:
        def add(mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self._on():
                return None
            h = output.to(self.adapter_down[index].weight.dtype)  # (B, T, D)
            gate = torch.sigmoid(self.gate_adapter[index](h))  # G_A (B, T, 1)
            return output + (gate * self.adapter_up[index](F.relu(self.adapter_down[index](h)))).to(output.dtype)

        return add

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeddings": self.prefix.prompt_embeddings.detach()}
        out.update({f"unipelt.{k}": v.detach() for k, v in self.state_dict().items() if not k.startswith("prefix.")})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prefix.prompt_embeddings.copy_(tensors["prompt_embeddings"])
        own = {k.removeprefix("unipelt."): v for k, v in tensors.items() if k.startswith("unipelt.")}
        self.load_state_dict({**own, "prefix.prompt_embeddings": tensors["prompt_embeddings"]})

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()
