"""Where a merge goes: a LoRA in the layouts its family is read in, or the weights of a base model folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personalize.errors import UserError
from personalize.formats.embeddings import Embeddings, merge_embeddings
from personalize.merge.inputs import StagedInput
from personalize.merge.layers import Merged

REPORT_FILE = "merge_report.json"


class LoraSink:
    """Collects merged factors as a canonical component dict (scale 1: alpha = rank), in `dtype`."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.components: dict[str, dict[str, torch.Tensor]] = {}
        self.dtype = dtype

    def __call__(self, module: str, merged: Merged) -> None:
        assert merged.down is not None and merged.up is not None
        component, _, path = module.partition(".")
        sd = self.components.setdefault(component, {})
        sd[f"{path}.lora_down.weight"] = merged.down.to(self.dtype).contiguous()
        sd[f"{path}.lora_up.weight"] = merged.up.to(self.dtype).contiguous()
        sd[f"{path}.alpha"] = torch.tensor(float(merged.down.shape[0]))


class BaseSink:
    """Adds each merged delta to the base layer's weight as it arrives (no delta is kept).

    With `restore`, the touched weights are kept and put back by `restore_weights` (a base the caller
    passed in is theirs: it is returned unchanged)."""

    def __init__(self, targets: Mapping[str, nn.Module], restore: bool) -> None:
        self.targets = targets
        self.originals: dict[str, torch.Tensor] = {}
        self.restore = restore

    def __call__(self, module: str, merged: Merged) -> None:
        assert merged.delta is not None
        component, _, path = module.partition(".")
        layer = self.targets[component].get_submodule(path)
        layer = getattr(layer, "base_layer", layer)
        weight = layer.weight
        if not weight.dtype.is_floating_point:
            raise UserError(f"{module} is quantized; --into-base needs a base loaded in float precision")
        delta = merged.delta.T if isinstance(layer, nn.Embedding) else merged.delta
        with torch.no_grad():
            if self.restore:
                self.originals[module] = weight.data.clone()
            weight.add_(delta.reshape(weight.shape).to(weight.device, weight.dtype))

    def restore_weights(self) -> None:
        with torch.no_grad():
            for module, original in self.originals.items():
                component, _, path = module.partition(".")
                layer = self.targets[component].get_submodule(path)
                getattr(layer, "base_layer", layer).weight.data.copy_(original)
        self.originals.clear()


def embeddings_of(staged: list[StagedInput]) -> Embeddings:
    """Every input's Textual Inversion tokens; one token in two inputs with different vectors is an error."""
    found: Embeddings = {}
    for item in staged:
        for token, parts in item.embeddings.items():
            if token in found and any(not torch.equal(found[token][c], parts[c]) for c in parts if c in found[token]):
                raise UserError(f"the token {token} is in two inputs with different embeddings; rename one")
        merge_embeddings(found, item.embeddings)
    return found


def write_lora(
    staged: list[StagedInput],
    components: dict[str, dict[str, torch.Tensor]],
    output: Path,
    family: str,
    method: str,
    rank: int | None,
    model: Any,
    report: Mapping[str, Any],
) -> list[Path]:
    from personalize.formats.io import _write_all, save_adapter

    unet = getattr(model, "unet", None)
    unet_config = dict(unet.config) if unet is not None and hasattr(unet, "config") else None
    hyper = {"merge": method, "rank": rank, "inputs": [s.source.path for s in staged]}
    base_model = next((s.metadata.get("personalize_base_model", "") for s in staged), "")
    files = save_adapter(
        output,
        components,
        method="lora",
        family=family,
        hyper=hyper,
        base_model=base_model,
        embeddings=embeddings_of(staged) or None,
        output_name=output.name or "merged",
        unet_config=unet_config,
        model=model if isinstance(model, nn.Module) else None,
    )
    return files + _write_all(output, {}, {REPORT_FILE: json.dumps(report, indent=2, sort_keys=True, default=str)})


def write_into_base(model: Any, staged: list[StagedInput], output: Path, report: Mapping[str, Any]) -> list[Path]:
    """The base with merged weights as a model folder (safetensors): a diffusers pipeline or a transformers model."""
    from personalize.formats.io import _write_all, embeddings_files

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output), safe_serialization=True)
    files = sorted(p for p in output.rglob("*") if p.is_file())
    found = embeddings_of(staged)
    extra = {name: (tensors, {}) for name, tensors in embeddings_files(found).items()} if found else {}
    return files + _write_all(output, extra, {REPORT_FILE: json.dumps(report, indent=2, sort_keys=True, default=str)})
