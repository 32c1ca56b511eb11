"""PASTA (Yang et al., EACL 2023 Findings, arXiv 2210.04382): tune only the special tokens' representations.

Before every decoder layer l, the hidden state of each special token (id s in `special_ids`) gets a
trainable vector:

    H_l[t] <- H_l[t] + e_{l, s}     for every position t holding special token s;  other tokens untouched

e starts at zero (the model is unchanged at step 0); L x S x D parameters. The paper tunes BERT's [CLS]
and [SEP]; on a causal LM the special tokens are the ones its chat template puts around every turn:
by default the model's BOS and EOS ids, or the ids you name. The special positions are read from
`input_ids` at each forward (also during generation with a cache).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from personalize.adapters.llama_adapter import attention_paths
from personalize.errors import UserError


def _default_special_ids(model: nn.Module) -> list[int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    ids = [getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None)]
    flat = [i for item in ids for i in (item if isinstance(item, list) else [item]) if i is not None]
    return sorted(set(flat))


class Pasta(nn.Module):
    method: ClassVar[str] = "pasta"
    any_model: ClassVar[bool] = True

    def __init__(self, model: nn.Module, special_ids: list[int] | None = None) -> None:
        super().__init__()
        layers = [path.rsplit(".", 1)[0] for path in attention_paths(model)]
        if not layers:
            raise UserError(
                f"pasta needs Llama-style decoder layers (a self_attn in each); {type(model).__name__} has none"
            )
        ids = list(special_ids) if special_ids else _default_special_ids(model)
        if not ids:
            raise UserError("pasta: the model names no BOS/EOS token; pass special_ids=[...]")
        hidden = model.get_submodule(layers[0]).self_attn.q_proj.in_features
        device = next(model.parameters()).device
        self.layers = layers
        self.register_buffer("special_ids", torch.tensor(ids, dtype=torch.long, device=device))
        self.vectors = nn.Parameter(torch.zeros(len(layers), len(ids), hidden, device=device))  # e (L, S, D)
        self.which: torch.Tensor | None = None  # (B, T) index into special_ids, -1 elsewhere
        self.__dict__["model"] = model  # not a submodule: read for its on/off scale
        self.handles = [
            model.get_submodule(path).register_forward_pre_hook(self._layer_hook(index), with_kwargs=True)
            for index, path in enumerate(layers)
        ]

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Before the model: which positions hold which special token."""
        ids = kwargs.get("input_ids")
        self.which = None
        if ids is not None:
            match = ids.unsqueeze(-1) == self.special_ids.to(ids.device)  # (B, T, S)
            self.which = torch.where(match.any(-1), match.int().argmax(-1), -1)
        return kwargs

    def _layer_hook(self, index: int) -> Any:
        def add(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            scales = self.__dict__["model"].__dict__.get("_personalize_prompt_scales", {})
            if self.which is None or not any(scale != 0 for scale in scales.values()):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[:2] != self.which.shape:  # inputs without ids at these positions
                return None
            table = torch.cat([self.vectors[index], self.vectors.new_zeros(1, self.vectors.shape[-1])])  # (S + 1, D)
            shifted = hidden + table[self.which].to(hidden.dtype)  # -1 -> the zero row
            if args:
                return (shifted, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": shifted}

        return add

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{path}.pasta_vectors": self.vectors[index].detach() for index, path in enumerate(self.layers)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for index, path in enumerate(self.layers):
                self.vectors[index].copy_(tensors[f"{path}.pasta_vectors"])

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()
