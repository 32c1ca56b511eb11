"""The toolkit's own file for methods no other tool reads (MPO, bottleneck adapters, ...).

OUT/personalize_adapter.safetensors   the canonical state dict ("<module path>.<param>")
    metadata: personalize_method, personalize_options (JSON: the inject options),
              personalize_paths (JSON: the wrapped module paths)

adapters.save_native(folder, model, "default", "houlsby", {"bottleneck": 16})
adapters.load_native(model, folder)   # injects the same method on the same paths, loads the weights
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from personalize.adapters.sparse import SPARSE_METHODS, pack, unpack
from personalize.errors import UserError

NATIVE_FILE = "personalize_adapter.safetensors"


def save_native(folder: str | Path, model: nn.Module, name: str, method: str, options: dict[str, Any]) -> Path:
    from personalize.adapters.inject import _layers, state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # clone: tensors shared between layers (Compacter's rules) are written once per layer
    dense = torch.contiguous_format
    tensors = {key: value.detach().cpu().clone(memory_format=dense) for key, value in state_dict(model, name).items()}
    if method in SPARSE_METHODS:  # only the trained entries
        tensors = pack(tensors)
    metadata = {
        "format": "pt",
        "personalize_method": method,
        "personalize_options": json.dumps(options, sort_keys=True),
        "personalize_paths": json.dumps([path for path, _ in _layers(model, name)]),
    }
    path = folder / NATIVE_FILE
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)
    return path


def load_native(model: nn.Module, folder: str | Path, name: str = "default") -> str:
    """Inject the adapter saved in `folder` into `model`; returns its method."""
    from personalize.adapters.inject import inject, load_state_dict, state_dict

    path = Path(folder).expanduser()
    path = path / NATIVE_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} does not exist; a personalize adapter folder holds {NATIVE_FILE}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "personalize_method" not in metadata:
        raise UserError(f"{path} has no personalize_method in its metadata; is it a personalize adapter file?")
    method = metadata["personalize_method"]
    options = json.loads(metadata.get("personalize_options", "{}"))
    paths = json.loads(metadata.get("personalize_paths", "[]"))
    if method == "fusion":  # the task adapters it attends over sit in subfolders named like them
        for task in options.get("adapters", []):
            load_native(model, path.parent / task, name=task)
    inject(model, method, targets=paths or None, name=name, **options)
    tensors = load_file(str(path))
    if method in SPARSE_METHODS:
        tensors = unpack(tensors, state_dict(model, name))
    load_state_dict(model, tensors, name)
    return method
