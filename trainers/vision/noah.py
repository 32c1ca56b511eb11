"""NOAH (Neural prOmpt seArcH; Zhang, Zhou & Liu 2022, arXiv 2206.04673): which of Adapter, LoRA and VPT,
and how large, in each block of a frozen ViT, found by a one-shot search.

Every block i of the image encoder gets the three modules at their largest size, sharing weights across
sizes (a smaller choice uses the leading slices of the larger one's weights, the paper's "weight
entanglement"):

    LoRA on q and v:   y = W x + B[:, :r_i] A[:r_i] x                 A (R, D) random, B (D, R) zero
    Adapter after the MLP's fc2:  h <- h + U[:, :d_i] relu(D[:d_i] h)   U zero
    VPT (deep): p_i learned tokens after CLS at the block's input (replacing the previous block's)

A configuration picks (r_i, d_i, p_i) per block from `lora_ranks`, `adapter_dims`, `vpt_tokens`
(0 = the module is off; the paper's space: {0, 1, 5, 9} for both and {0, 5, 10, 50, 100} tokens).
1. Supernet: every step trains a uniformly sampled configuration (on part of the training images).
2. Search: an evolutionary search (a random population, then mutations and crossovers of the best quarter)
   scores configurations by accuracy on the rest of the training images (the search split), under `max_params` if set.
3. Retrain: the chosen subnet from scratch on all training images; the held-out split is never seen
   before the final accuracy.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.errors import UserError

DEFAULTS: dict[str, Any] = {
    "lora_ranks": [0, 1, 5, 9],
    "adapter_dims": [0, 1, 5, 9],
    "vpt_tokens": [0, 5, 10],
    "population": 12,  # configurations of the first generation
    "generations": 2,  # rounds of mutating and crossing the best quarter
    "mutation": 0.2,  # chance that a block's choice of one module is redrawn
    "search_split": 0.3,  # share of each class's training images the search scores on
    "max_params": 0,  # parameter budget of a configuration (0: none)
}
Config = list[dict[str, int]]  # per block: {"lora": r, "adapter": d, "vpt": p}


def _attention(layer: nn.Module) -> nn.Module:
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


class NoahBlock(nn.Module):
    """The three modules of one block at their largest sizes, and the sizes active now."""

    def __init__(self, width: int, rank: int, dim: int, tokens: int, generator: torch.Generator) -> None:
        super().__init__()
        self.lora_a = nn.Parameter(torch.randn(2, rank, width, generator=generator) / width**0.5)  # (q|v, R, D)
        self.lora_b = nn.Parameter(torch.zeros(2, width, rank))  # (q|v, D, R)
        self.down = nn.Parameter(torch.randn(dim, width, generator=generator) / width**0.5)  # (d, D)
        self.down_bias = nn.Parameter(torch.zeros(dim))
        self.up = nn.Parameter(torch.zeros(width, dim))  # (D, d)
        self.prompts = nn.Parameter(torch.randn(tokens, width, generator=generator) * 0.02)  # (p, D)
        self.active = {"lora": rank, "adapter": dim, "vpt": tokens}

    def lora(self, which: int, x: torch.Tensor) -> torch.Tensor:
        r = self.active["lora"]
        a, b = self.lora_a[which, :r], self.lora_b[which, :, :r]  # (r, D), (D, r)
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))  # (B, T, D)

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        d = self.active["adapter"]
        hidden = F.relu(F.linear(h, self.down[:d].to(h.dtype), self.down_bias[:d].to(h.dtype)))  # (B, T, d)
        return F.linear(hidden, self.up[:, :d].to(h.dtype))  # (B, T, D)


class Noah(nn.Module):
    """The supernet (or, built at the chosen sizes, the final subnet) hooked into the image encoder."""

    def __init__(self, backbone: Any, ranks: int | list[int], dims: int | list[int], tokens: int | list[int]) -> None:
        super().__init__()
        layers = backbone.layers()
        n = len(layers)
        per_block = [v if isinstance(v, list) else [v] * n for v in (ranks, dims, tokens)]
        width = backbone.vision.config.hidden_size
        generator = torch.Generator().manual_seed(0)
        self.blocks = nn.ModuleList(NoahBlock(width, r, d, p, generator) for r, d, p in zip(*per_block, strict=True))
        self._hooks = []
        for index, layer in enumerate(layers):
            attention = _attention(layer)
            self._hooks += [
                attention.q_proj.register_forward_hook(self._lora(index, 0)),
                attention.v_proj.register_forward_hook(self._lora(index, 1)),
                layer.mlp.fc2.register_forward_hook(self._adapter(index)),
                layer.register_forward_pre_hook(self._prompts(index), with_kwargs=True),
            ]

    def _lora(self, index: int, which: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            block = self.blocks[index]
            return output + block.lora(which, inputs[0]) if block.active["lora"] else None

        return hook

    def _adapter(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            block = self.blocks[index]
            return output + block.adapter(output) if block.active["adapter"] else None

        return hook

    def _prompts(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, 1 + before + P, D)
            before = self.blocks[index - 1].active["vpt"] if index else 0
            p = self.blocks[index].active["vpt"]
            prompts = self.blocks[index].prompts[:p].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1 + before :]], dim=1)  # (B, 1 + p + P, D)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return hook

    def set_config(self, config: Config) -> None:
        for block, choice in zip(self.blocks, config, strict=True):
            block.active = dict(choice)

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()


def config_params(config: Config, width: int) -> int:
    """Parameters a configuration trains: LoRA 2 x 2 r D, adapter 2 d D + d, VPT p D."""
    return sum(4 * c["lora"] * width + 2 * c["adapter"] * width + c["adapter"] + c["vpt"] * width for c in config)


def random_config(space: dict[str, list[int]], blocks: int, rng: random.Random) -> Config:
    return [{key: rng.choice(values) for key, values in space.items()} for _ in range(blocks)]


def mutate(config: Config, space: dict[str, list[int]], chance: float, rng: random.Random) -> Config:
    return [
        {key: rng.choice(space[key]) if rng.random() < chance else value for key, value in c.items()} for c in config
    ]


def crossover(first: Config, second: Config, rng: random.Random) -> Config:
    """Each block's choice of each module from one of two parents."""
    return [{key: rng.choice((a[key], b[key])) for key in a} for a, b in zip(first, second, strict=True)]


def options(raw: dict[str, Any]) -> dict[str, Any]:
    unknown = set(raw) - set(DEFAULTS) - {"config"}
    if unknown:
        raise UserError(f"noah: unknown method_options {sorted(unknown)}; known: {', '.join(DEFAULTS)}, config")
    merged = {**DEFAULTS, **raw}
    for key in ("lora_ranks", "adapter_dims", "vpt_tokens"):
        values = merged[key]
        if not isinstance(values, list) or not values or any(not isinstance(v, int) or v < 0 for v in values):
            raise UserError(f"noah: method_options.{key} must be a list of sizes >= 0 (got {values!r})")
    if not 0 < merged["search_split"] < 1:
        raise UserError(f"noah: search_split must be between 0 and 1 (got {merged['search_split']})")
    return merged


def space_of(opts: dict[str, Any]) -> dict[str, list[int]]:
    return {"lora": opts["lora_ranks"], "adapter": opts["adapter_dims"], "vpt": opts["vpt_tokens"]}


def search(
    supernet: Noah,
    score: Any,
    opts: dict[str, Any],
    width: int,
    seed: int,
) -> tuple[Config, float, int]:
    """Evolutionary search: (best configuration, its search accuracy, configurations scored).
    `score(config)` sets the configuration and returns its accuracy on the search split."""
    space, blocks = space_of(opts), len(supernet.blocks)
    rng = random.Random(seed)
    budget = opts["max_params"]

    def draw(make: Any) -> Config:
        """A candidate within the budget: over it, random modules are switched off until it fits."""
        config = make()
        while budget and config_params(config, width) > budget:
            block, key = rng.choice([(i, key) for i, c in enumerate(config) for key, size in c.items() if size])
            config[block] = {**config[block], key: 0}
        return config

    scored: dict[str, tuple[float, Config]] = {}

    def evaluate(config: Config) -> None:
        key = repr(config)
        if key not in scored:  # ties: the smaller configuration wins (fewer parameters, same accuracy)
            scored[key] = (score(config), config)

    for _ in range(opts["population"]):
        evaluate(draw(lambda: random_config(space, blocks, rng)))
    for _ in range(opts["generations"]):
        ranked = sorted(scored.values(), key=lambda item: (-item[0], config_params(item[1], width)))
        parents = [config for _, config in ranked[: max(1, len(ranked) // 4)]]
        for child in range(opts["population"]):  # half mutations, half crossovers (as NOAH's evolution)
            first, second = rng.choice(parents), rng.choice(parents)
            if child % 2:
                evaluate(draw(lambda first=first, second=second: crossover(first, second, rng)))
            else:
                evaluate(draw(lambda first=first: mutate(first, space, opts["mutation"], rng)))
    best_accuracy, best = max(scored.values(), key=lambda item: (item[0], -config_params(item[1], width)))
    return best, best_accuracy, len(scored)
