"""Writing what a run produced. The ONE place that decides file names and layouts (DESIGN.md "Files we write").

- LoRA family (lora, locon, dora): `pytorch_lora_weights.safetensors` (stock `pipe.load_lora_weights(OUT)`)
  and `<name>.safetensors` in kohya keys (A1111, ComfyUI), both through `personalize.formats.save_adapter`.
- LyCORIS family (loha, lokr, krona, ia3, oft, boft): `<name>.safetensors` in kohya/LyCORIS keys.
- Selective methods (bitfit, norm), which no other tool reads: `adapter.safetensors`, the injection
  core's state dict with a component prefix ("unet.", "text_encoder.", ...) and the method in metadata.
- `full`: each trained component as a diffusers model folder (`unet/`, safetensors).
- Textual Inversion / pivotal (`save_token_outputs`): `learned_embeds.safetensors` (+ `learned_embeds_2` on
  SDXL, + `a1111/<token>.safetensors`) and, for pivotal, the adapter as above.
`personalize.pipelines.load_adapter(pipe, OUT)` reads every adapter layout above except `adapter.safetensors`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CANONICAL_FILE = "adapter.safetensors"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
SHARED_FORMAT_METHODS = ("lora", "locon", "dora", "loha", "lokr", "krona", "ia3", "oft", "boft")
EMBEDDING_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")  # textual-inversion / pivotal


def _clear_previous(output_dir: Path, output_name: str) -> None:
    """A rerun into the same folder must not leave another method's file for a loader to pick."""
    for name in (CANONICAL_FILE, DIFFUSERS_FILE, f"{output_name}.safetensors", *EMBEDDING_FILES):
        (output_dir / name).unlink(missing_ok=True)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if (output_dir / name / "config.json").is_file():
            shutil.rmtree(output_dir / name)


def save_outputs(
    output_dir: Path,
    *,
    method: str,
    family: str,
    base_model: str,
    components: dict[str, torch.nn.Module],
    adapter_name: str = "default",
    hyper: dict[str, Any] | None = None,
    resolution: int | None = None,
) -> list[Path]:
    """Save the trained weights of `components` ({"unet": module, "text_encoder": module, ...})."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output_name = output_dir.name or "adapter"
    _clear_previous(output_dir, output_name)
    if method == "full":
        paths = []
        for component, module in components.items():
            module.save_pretrained(str(output_dir / component), safe_serialization=True)  # type: ignore[operator]
            paths.append(output_dir / component)
        return paths
    if method in SHARED_FORMAT_METHODS:
        return _save_shared(output_dir, components, adapter_name, method, family, base_model, hyper, resolution)
    states = _adapter_states(components, adapter_name)
    tensors = {
        f"{component}.{key}": value.contiguous() for component, sd in states.items() for key, value in sd.items()
    }
    info = {"method": method, "hyperparameters": hyper or {}, "family": family, "base_model": base_model}
    path = output_dir / CANONICAL_FILE
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"personalize": json.dumps(info, sort_keys=True)})
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
    output_dir = Path(output_dir)
    _clear_previous(output_dir, output_dir.name or "adapter")
    args = (output_dir, components, adapter_name, method, family, base_model, hyper, resolution)
    files = _save_shared(*args, embeddings=embeddings)
    return sorted(files, key=lambda path: (path.parent != output_dir, path.name))


def _adapter_states(components: dict[str, torch.nn.Module], adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """{component: canonical adapter state dict on the CPU}."""
    from personalize import adapters

    return {
        component: {key: value.detach().to("cpu") for key, value in adapters.state_dict(module, adapter_name).items()}
        for component, module in components.items()
    }


def _save_shared(
    output_dir: Path,
    components: dict[str, torch.nn.Module],
    adapter_name: str,
    method: str,
    family: str,
    base_model: str,
    hyper: dict[str, Any] | None,
    resolution: int | None,
    embeddings: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[Path]:
    """The adapter in the layouts personalize.formats writes for its method (+ embeddings, for pivotal)."""
    from personalize.formats import save_adapter

    unet = components.get("unet")
    return save_adapter(
        output_dir,
        _adapter_states(components, adapter_name),
        method=method,
        family=family,
        hyper=hyper or {},
        base_model=base_model,
        embeddings=embeddings,
        resolution=resolution,
        output_name=output_dir.name or "adapter",
        unet_config=getattr(unet, "config", None) if family == "sdxl" else None,
    )
