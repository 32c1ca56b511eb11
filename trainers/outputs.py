"""Writing what a run produced. The ONE place that decides file names and layouts.

Until `personalize.formats` exists, adapters are saved as `adapter.safetensors`: the injection
core's canonical state dict (`adapters.state_dict`) with a component prefix ("unet.",
"text_encoder.", "text_encoder_2.") and safetensors metadata {"personalize": JSON of method,
hyperparameters, family, base model}. A full fine-tune saves the UNet as a diffusers model
folder (`unet/`, safetensors) that `UNet2DConditionModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ADAPTER_FILE = "adapter.safetensors"


def adapter_metadata(method: str, hyper: dict[str, Any], family: str, base_model: str, targets: str) -> dict[str, str]:
    info = {"method": method, "hyperparameters": hyper, "family": family, "base_model": base_model, "targets": targets}
    return {"personalize": json.dumps(info, sort_keys=True)}


def save_outputs(
    output_dir: Path,
    *,
    method: str,
    family: str,
    base_model: str,
    components: dict[str, torch.nn.Module],
    adapter_name: str = "default",
    hyper: dict[str, Any] | None = None,
    targets: str = "",
) -> list[Path]:
    """Save the trained weights of `components` ({"unet": module, "text_encoder": module, ...})."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if method == "full":
        paths = []
        for component, module in components.items():
            folder = output_dir / component
            module.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
            paths.append(folder)
        return paths
    from personalize import adapters

    tensors: dict[str, torch.Tensor] = {}
    for component, module in components.items():
        for key, value in adapters.state_dict(module, adapter_name).items():
            tensors[f"{component}.{key}"] = value.detach().to("cpu").contiguous()
    path = output_dir / ADAPTER_FILE
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=adapter_metadata(method, hyper or {}, family, base_model, targets))
    partial.replace(path)
    return [path]


def save_token_outputs(
    output_dir: Path,
    *,
    method: str,
    family: str,
    base_model: str,
    components: dict[str, torch.nn.Module],
    embeddings: dict[str, dict[str, torch.Tensor]],
    adapter_name: str = "default",
    hyper: dict[str, Any] | None = None,
    resolution: int | None = None,
) -> list[Path]:
    """Textual Inversion / pivotal: learned_embeds.safetensors (+ learned_embeds_2 for SDXL, + an A1111 export)
    and, for pivotal, the adapter in the layouts personalize.formats writes for its method (diffusers
    pytorch_lora_weights.safetensors and/or kohya), all in one folder that
    `personalize.pipelines.load_adapter(pipe, output_dir)` loads together."""
    from personalize import adapters
    from personalize.formats import save_adapter

    states = {component: adapters.state_dict(module, adapter_name) for component, module in components.items()}
    states = {
        component: {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
        for component, state in states.items()
    }
    files = save_adapter(
        output_dir,
        states,
        method=method,
        family=family,
        hyper=hyper or {},
        base_model=base_model,
        embeddings=embeddings,
        resolution=resolution,
    )
    return sorted(files, key=lambda path: (path.parent != Path(output_dir), path.name))
