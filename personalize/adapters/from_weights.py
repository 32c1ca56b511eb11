"""Attach adapters whose shapes come from saved weights (loading files), and describe what is attached."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from personalize.adapters import selective
from personalize.adapters.base import base_weight_shape
from personalize.adapters.difffit import DiffFitScale
from personalize.adapters.ia3 import IA3
from personalize.adapters.inject import _layers, _names, _set_module
from personalize.adapters.layer import AdapterLayer
from personalize.adapters.loha import LoHa
from personalize.adapters.lokr import LoKr
from personalize.adapters.lora import LoRA
from personalize.adapters.oft import BOFT, OFT
from personalize.adapters.targets import wrappable_paths
from personalize.adapters.vera import VeRA
from personalize.errors import UserError

# Parameter names per method, longest first so that "x.lora_down.weight" is not read as IA3's "weight".
PARAM_NAMES = (
    "lora_down.weight",
    "lora_up.weight",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_w1",
    "lokr_w2",
    "lokr_t2",
    "oft_blocks",
    "rescale",
    "difffit_gamma",
    "vera_lambda_b",
    "vera_lambda_d",
    "vera_A",
    "vera_B",
    "on_input",
    "alpha",
    "weight",
)


def group_by_module(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"a.b.lora_up.weight": t} -> {"a.b": {"lora_up.weight": t}}; unknown parameter names are errors."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        param = next((p for p in PARAM_NAMES if key.endswith("." + p)), None)
        if param is None:
            raise UserError(
                f"'{key}' is not an adapter weight this toolkit knows (expected a suffix like .lora_up.weight)"
            )
        groups[key[: -len(param) - 1]][param] = value
    return dict(groups)


def _adapter_for(base: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    if "lora_down.weight" in tensors:
        adapter = LoRA(base, **LoRA.hyper_from_tensors(tensors))
    elif "hada_w1_a" in tensors:
        adapter = LoHa(base, **LoHa.hyper_from_tensors(tensors))
    elif any(k.startswith("lokr_") for k in tensors):
        weight_shape = torch.Size(base_weight_shape(base))
        adapter = LoKr(base, **LoKr.hyper_from_tensors(tensors, weight_shape))
    elif "difffit_gamma" in tensors:
        adapter = DiffFitScale(base)
    elif "vera_lambda_b" in tensors:
        adapter = VeRA(base, **VeRA.hyper_from_tensors(tensors))
    elif "oft_blocks" in tensors:
        builder = OFT if tensors["oft_blocks"].dim() == 3 else BOFT
        adapter = builder(base, **builder.hyper_from_tensors(tensors, torch.Size(base_weight_shape(base))))
    elif "weight" in tensors:
        adapter = IA3(base, **IA3.hyper_from_tensors(tensors))
    else:
        raise UserError(f"cannot tell the adapter method from the parameters {sorted(tensors)}")
    if "dora_scale" in tensors and isinstance(adapter, LoRA):
        adapter.dora_scale.data = adapter.dora_scale.data.reshape(tensors["dora_scale"].shape)
    return adapter


def inject_from_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], name: str = "default", scale: float = 1.0
) -> list[str]:
    """Wrap the layers named in `tensors` (canonical keys) with adapters of the saved shapes and values.

    Keys for layers the model does not have are an error that names them; nothing is attached then."""
    if name in _names(model):
        raise UserError(f"an adapter named '{name}' is already on this model; pick another name or remove it first")
    groups = group_by_module(tensors)
    known = set(wrappable_paths(model))
    unknown = sorted(path for path in groups if path not in known)
    if unknown:
        raise UserError(
            f"{len(unknown)} of {len(groups)} adapter modules do not exist in this {type(model).__name__} "
            f"(e.g. {', '.join(unknown[:3])}); is the adapter for another model family?"
        )
    for path, group in groups.items():
        module = model.get_submodule(path)
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
        adapter = _adapter_for(layer.base_layer, group)
        adapter.load_state_dict(group, strict=True)
        adapter.to(device=layer.base_layer.weight.device)
        layer.add(name, adapter, scale)
        if layer is not module:
            _set_module(model, path, layer)
    return sorted(groups)


def describe(model: nn.Module) -> str:
    """One line per adapter: name, method, layers, trainable parameters, scale, merged."""
    rows: dict[str, dict] = {}
    for _, layer in _layers(model):
        for name, adapter in layer.adapters.items():
            row = rows.setdefault(
                name, {"method": adapter.method, "layers": 0, "params": 0, "scale": layer.scales[name]}
            )
            row["layers"] += 1
            row["params"] += sum(p.numel() for p in adapter.parameters())
            row["merged"] = name in layer.merged
    parameters = dict(model.named_parameters())
    for name, adapter in selective.registry(model).items():
        count = sum(parameters[n].numel() for n in adapter.originals)
        rows[name] = {
            "method": adapter.method,
            "layers": len(adapter.originals),
            "params": count,
            "scale": adapter.scale,
        }
    if not rows:
        return "no adapters"
    return "\n".join(
        f"{name}: {r['method']} on {r['layers']} layers, {r['params']:,} parameters, scale {r['scale']:g}"
        + (", merged" if r.get("merged") else "")
        for name, r in rows.items()
    )
