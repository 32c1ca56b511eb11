"""Fuse adapters into the base weights and take them out again without drift.

`adapters.merge` / `unmerge` fold W' = W + s dW and back by arithmetic, which rounds (and re-quantizes a
4-bit base each time). Before the first adapter is fused into a layer we keep that layer's weight;
when the last fused adapter of the layer is unfused, the kept weight is put back, so fuse + unfuse
returns the exact base weights. Merging writes a new tensor (or, for 4-bit, a new parameter) into the
layer rather than changing the old one, so on CPU keeping costs no copy: we hold on to the old
tensor. On an accelerator we keep a CPU copy instead, so that GPU memory does not grow.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from personalize import adapters
from personalize.adapters import AdapterLayer
from personalize.adapters.quant import quant_mode

Originals = dict[str, Any]  # "<component>.<layer path>" -> the base weight before the first fuse


def _layers(module: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    return [
        (path, layer)
        for path, layer in module.named_modules()
        if isinstance(layer, AdapterLayer) and name in layer.adapters
    ]


def _keep(weight: nn.Parameter, quantized: bool) -> Any:
    if quantized:  # the Parameter object: merge replaces it with a re-quantized one
        return weight
    if weight.device.type == "cpu":  # merge swaps a new tensor into the Parameter: this one stays as it was
        return weight.data
    return weight.detach().to("cpu", copy=True)  # accelerator memory stays free


def fuse_component(module: nn.Module, component: str, name: str, originals: Originals | None) -> None:
    """Merge adapter `name` into `module`; keep the untouched weights in `originals` (None: keep nothing)."""
    if originals is not None:
        for path, layer in _layers(module, name):
            key = f"{component}.{path}"
            if not layer.merged and key not in originals:
                base = layer.base_layer
                originals[key] = _keep(base.weight, quant_mode(base) is not None)
    adapters.merge(module, name)


def unfuse_component(module: nn.Module, component: str, name: str, originals: Originals) -> None:
    """Unmerge adapter `name`; layers with nothing fused any more get their kept weights back exactly."""
    adapters.unmerge(module, name)
    for path, layer in _layers(module, name):
        key = f"{component}.{path}"
        if layer.merged or key not in originals:
            continue
        kept, base = originals.pop(key), layer.base_layer
        if isinstance(kept, nn.Parameter) and quant_mode(base) is not None:
            base.weight = kept
        elif kept.device == base.weight.device:
            base.weight.data = kept
        else:
            with torch.no_grad():
                base.weight.copy_(kept)
