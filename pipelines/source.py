"""Turn what the user passed to `load_adapter` into component dicts and embeddings.

Accepted: a path (a run's output dir or any adapter file: diffusers, kohya/LyCORIS, A1111/diffusers
embeddings, read by `personalize.formats.read_adapter`), a *canonical* `.safetensors` file whose keys
are "<component>.<module path>.<param>" (e.g. "unet.down_blocks.1.attentions.0...to_q.lora_down.weight"),
an `AdapterFile`, or a component dict {"unet": {canonical state dict}, "text_encoder": {...}}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalize.adapters import group_by_module
from personalize.adapters.targets import wrappable_paths
from personalize.errors import UserError
from personalize.pipelines.components import ADAPTER_COMPONENTS, pipeline_components

Components = dict[str, dict[str, torch.Tensor]]
Embeddings = dict[str, dict[str, torch.Tensor]]  # {token: {"text_encoder": (n, d), "text_encoder_2": ...}}


@dataclass
class AdapterSource:
    components: Components
    embeddings: Embeddings = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    label: str = "<in memory>"  # what the PNG metadata records: the path, or "<in memory>"


def split_canonical(tensors: Mapping[str, torch.Tensor]) -> Components | None:
    """{"unet.a.b.lora_up.weight": t} -> {"unet": {"a.b.lora_up.weight": t}}, or None if a key has no
    component prefix."""
    components: Components = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in ADAPTER_COMPONENTS or not rest:
            return None
        components.setdefault(component, {})[rest] = value
    return components


def fits_pipeline(components: Components, pipe: Any) -> bool:
    """True when every module path in `components` is a layer of the matching pipeline component."""
    present = pipeline_components(pipe)
    for component, tensors in components.items():
        if component not in present:
            return False
        try:
            paths = group_by_module(tensors)
        except UserError:
            return False
        if not set(paths) <= set(wrappable_paths(present[component])):
            return False
    return True


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for a bad header
        raise UserError(f"{path} is not a readable .safetensors file ({error})") from None


def _read_full(folder: Path) -> AdapterSource | None:
    """A `--method full` run folder: the fine-tuned UNet's parameters (loaded like a selective adapter, so
    it scales and unloads; its originals are kept aside)."""
    import json

    files = sorted((folder / "unet").glob("*.safetensors")) if (folder / "unet" / "config.json").is_file() else []
    if not files:
        return None
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_read_safetensors(file)[0])
    return AdapterSource({"unet": tensors}, {}, {"personalize": json.dumps({"method": "full"})}, str(folder))


def _read_selective(path: Path) -> AdapterSource | None:
    """A bitfit/norm run's `adapter.safetensors` (or its folder), or a full fine-tune's folder: trained
    values of named parameters."""
    from personalize.formats.detect import SELECTIVE_FILE, selective_method

    if path.is_dir() and (full := _read_full(path)) is not None:
        return full
    file = path / SELECTIVE_FILE if path.is_dir() else path
    if not file.is_file() or file.suffix.lower() != ".safetensors":
        return None
    tensors, metadata = _read_safetensors(file)
    components = split_canonical(tensors)
    if selective_method(metadata) is None or components is None:
        return None
    return AdapterSource(components, {}, metadata, str(path))


def _read_path(path: Path, pipe: Any, allow_pickle: bool) -> AdapterSource:
    if not path.exists():
        raise UserError(f"adapter {path} does not exist; pass a run's output folder or an adapter file")
    selective = _read_selective(path)
    if selective is not None:
        return selective
    formats_error = None
    try:
        from personalize.formats import read_adapter
    except ImportError as error:  # the formats package is optional at this layer
        read_adapter, formats_error = None, error
    if path.is_file() and path.suffix.lower() == ".safetensors":
        tensors, metadata = _read_safetensors(path)
        components = split_canonical(tensors)
        if components is not None and (read_adapter is None or fits_pipeline(components, pipe)):
            return AdapterSource(components, {}, metadata, str(path))
    if read_adapter is None:
        raise UserError(
            f"{path}: only canonical '<component>.<module path>.<param>' safetensors files can be read without "
            f"personalize.formats ({formats_error}); reinstall personalize"
        )
    adapter_file = read_adapter(path, pipe, allow_pickle=allow_pickle)
    return AdapterSource(
        dict(adapter_file.components), dict(adapter_file.embeddings), dict(adapter_file.metadata), str(path)
    )


def _read(source: Any, pipe: Any, allow_pickle: bool = False) -> AdapterSource:
    """Whatever `load_adapter` got -> AdapterSource (see the module doc)."""
    if isinstance(source, (str, Path)):
        return _read_path(Path(source), pipe, allow_pickle)
    if isinstance(source, AdapterSource):
        return source
    if hasattr(source, "components") and hasattr(source, "embeddings"):  # a formats.AdapterFile
        return AdapterSource(
            dict(source.components), dict(source.embeddings), dict(getattr(source, "metadata", {}) or {})
        )
    if isinstance(source, Mapping) and all(isinstance(value, Mapping) for value in source.values()):
        return AdapterSource({component: dict(tensors) for component, tensors in source.items()})
    raise UserError(
        f"load_adapter takes a path, an AdapterFile or a component dict {{'unet': {{...}}}}, "
        f"not {type(source).__name__}"
    )
