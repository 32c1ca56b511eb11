"""Ladder Side-Tuning (Sung et al., NeurIPS 2022, arXiv 2206.06522): a small side network fed by the
frozen backbone's activations; nothing backpropagates through the backbone.

With backbone hidden states h_0 (embeddings) .. h_L (layer outputs), reduction r and side width D / r:

    s_0 = W_0 h_0
    s_l = Side_l( mu_l s_{l-1} + (1 - mu_l) W_l h_l ),    mu_l = sigmoid(alpha_l / T),  alpha_l = 0, T = 0.1
    y   = norm(h_L) + W_up norm_s(s_L)       -> the (frozen) LM head;  W_up starts at zero

Side_l is a Llama decoder layer of width D / r with H / r heads of the backbone's head size (so it
reuses the backbone's rotary embeddings and causal mask), randomly initialized (the paper initializes it
from a pruned copy of the backbone). The W_l read detached activations and every backbone weight is
frozen, so the backbone builds no autograd graph: training memory is the side network's. The side
network keeps its own KV cache during generation. Llama-style decoders (also LLaVA's language model).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from personalize.adapters.llama_adapter import attention_paths
from personalize.errors import UserError


class Ladder(nn.Module):
    method: ClassVar[str] = "ladder"
    any_model: ClassVar[bool] = True

    def __init__(self, model: nn.Module, reduction: int = 8, temperature: float = 0.1) -> None:
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

        layers = [path.rsplit(".", 1)[0] for path in attention_paths(model)]
        norm_path = layers[0].rsplit(".", 2)[0] + ".norm" if layers else ""
        if not layers or not isinstance(_get(model, norm_path), nn.Module):
            raise UserError(
                "ladder needs a Llama-style decoder (layers with self_attn, a final norm); "
                f"{type(model).__name__} has none"
            )
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        side_heads, side_kv = heads // max(1, reduction), max(1, kv_heads // max(1, reduction))
        if reduction < 1 or heads % reduction or side_heads % side_kv:
            raise UserError(f"ladder: reduction {reduction} must divide the {heads} attention heads")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        side = LlamaConfig(
            hidden_size=side_heads * head_dim,
            intermediate_size=max(1, config.intermediate_size // reduction),
            num_attention_heads=side_heads,
            num_key_value_heads=side_kv,
            head_dim=head_dim,
            num_hidden_layers=len(layers),
            rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
        )
        # the backbone's attention kernel: it reads the same causal mask (None = causal, for sdpa)
        side._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        dim, width = config.hidden_size, side.hidden_size
        device = next(model.parameters()).device
        self.downs = nn.ModuleList(nn.Linear(dim, width, bias=False) for _ in range(len(layers) + 1))  # W_0 .. W_L
        self.blocks = nn.ModuleList(LlamaDecoderLayer(side, index) for index in range(len(layers)))
        self.gates = nn.Parameter(torch.zeros(len(layers)))  # alpha_l
        self.side_norm = LlamaRMSNorm(width, eps=side.rms_norm_eps)
        self.up = nn.Linear(width, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.to(device)
        self.layers, self.norm_path, self.temperature = layers, norm_path, temperature
        self.state: torch.Tensor | None = None  # s_l while a forward pass runs
        self.side_cache: Any = None
        self.__dict__["model"] = model
        self.handles = [_get(model, layers[0]).register_forward_pre_hook(self._start, with_kwargs=True)]
        self.handles += [
            _get(model, path).register_forward_hook(self._step(index), with_kwargs=True)
            for index, path in enumerate(layers)
        ]
        self.handles.append(_get(model, norm_path).register_forward_hook(self._finish))

    def _on(self) -> bool:
        scales = self.__dict__["model"].__dict__.get("_personalize_prompt_scales", {})
        return any(scale != 0 for scale in scales.values())

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Before the model: a fresh side cache with a fresh backbone cache, none without one."""
        from transformers import DynamicCache

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache", getattr(model.config, "use_cache", False))
        if cache is None and not use_cache:
            self.side_cache = None
        elif cache is None or cache.get_seq_length() == 0:
            self.side_cache = DynamicCache()
        return kwargs

    def _start(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.state = None
        if self._on():
            embeddings = (args[0] if args else kwargs["hidden_states"]).detach()  # h_0 (B, T, D)
            self.state = self.downs[0](embeddings.to(self.downs[0].weight.dtype))  # s_0 (B, T, D / r)

    def _step(self, index: int) -> Any:
        def side(layer: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if self.state is None:
                return
            hidden = (output[0] if isinstance(output, tuple) else output).detach()  # h_l, no graph
            mu = torch.sigmoid(self.gates[index] / self.temperature)
            mixed = mu * self.state + (1 - mu) * self.downs[index + 1](hidden.to(self.state.dtype))
            result = self.blocks[index](
                mixed,
                attention_mask=kwargs.get("attention_mask"),
                position_embeddings=tuple(p.to(mixed.dtype) for p in kwargs["position_embeddings"]),
                position_ids=kwargs.get("position_ids"),
                cache=self.side_cache,
                use_cache=self.side_cache is not None,
            )
            self.state = result[0] if isinstance(result, tuple) else result

        return side

    def _finish(self, norm: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.state is None:
            return None
        added = self.up(self.side_norm(self.state))  # (B, T, D)
        self.state = None
        return output + added.to(output.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ladder.{key}": value.detach() for key, value in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({key.removeprefix("ladder."): value for key, value in tensors.items()})

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
