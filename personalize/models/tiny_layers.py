"""Tiny single-layer models for adapter tests: every base layer type the core wraps, seeded."""

from __future__ import annotations

import logging

import torch
from torch import nn

LAYERS = ("linear", "conv3x3", "conv1x1", "embedding", "linear4bit", "linear8bit", "conv4bit")


class Holder(nn.Module):
    """A model with one layer at path 'block.layer' (so targets and keys have a real path)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.layer(x)


def build_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(16, 24)
    if kind == "conv3x3":
        return nn.Conv2d(8, 12, 3, padding=1)
    if kind == "conv1x1":
        return nn.Conv2d(8, 12, 1)
    if kind == "embedding":
        return nn.Embedding(20, 16)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    if kind == "conv4bit":
        from personalize.adapters.quant_conv import Conv2d4bit

        return Conv2d4bit(nn.Conv2d(8, 12, 3, padding=1), "nf4")

    plain = nn.Linear(64, 64)
    if kind == "linear4bit":
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(plain.weight.data.clone(), requires_grad=False, quant_type="nf4", module=layer)
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(plain.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(plain.bias.data.clone())
    return layer.to("cpu")


def sample_input(kind: str, batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "linear":
        return torch.randn(batch, 5, 16, generator=generator)
    if kind.startswith("conv"):
        return torch.randn(batch, 8, 6, 6, generator=generator)
    if kind == "embedding":
        return torch.randint(0, 20, (batch, 7), generator=generator)
    return torch.randn(batch, 5, 64, generator=generator)


def randomize(module: nn.Module, seed: int = 2) -> None:
    """Give adapter factors non-zero values so that every delta is visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.2
            p.copy_(p.abs() + 0.5 if name.endswith("dora_scale") else noise)
