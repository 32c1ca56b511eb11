"""Weights that stay on disk until used: the safetensors files a loaded module came from.

diffusers and transformers load safetensors weights as read-only memory maps, so a weight costs
resident memory only once it is read. Two things follow, both for CPU memory:

- `remap(module)`: after the latent/text caches are built, the VAE and text encoders sit idle until
  validation, yet every page the encoding (and the cache fingerprint) read stays resident. Pointing
  the module at a fresh map of the same files lets those pages go; they are read back from the OS
  page cache if the module is used again.
- `tensor_reader(module)`: quantizing a base reads each full-precision weight once. Through the map,
  every page read stays resident until the whole file is unmapped (the peak is the fp32 model);
  reading each tensor into its own buffer instead keeps one tensor at a time.

Both apply only to modules loaded from a folder of safetensors files that match the module (not models
built in code or single-file checkpoints; `remap` also needs the same dtypes); they report False / None
otherwise and the caller keeps the module as it is.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def weight_files(module: nn.Module) -> list[Path] | None:
    """The safetensors file(s) `from_pretrained` read `module` from, or None when unknown."""
    config = getattr(module, "config", None)
    name_or_path = getattr(config, "_name_or_path", None)  # diffusers and transformers configs alike
    if not name_or_path or not Path(name_or_path).is_dir():
        return None
    folder = Path(name_or_path)
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        single = folder / f"{name}.safetensors"
        if single.is_file():
            return [single]
    return None


def _header(path: Path) -> tuple[dict, int]:
    """safetensors layout: u64 little-endian header size, JSON header, then the raw tensor bytes."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def tensor_reader(module: nn.Module) -> Callable[[str], torch.Tensor | None] | None:
    """name -> a fresh tensor read from the module's files (no memory map; the file's dtype), None for a
    name the files lack (a tied or renamed weight: the caller reads the module's own); None when the
    module has no files or its files hold another layout (a shape differs)."""
    files = weight_files(module)
    if files is None:
        return None
    where: dict[str, tuple[Path, int, dict]] = {}
    for path in files:
        header, start = _header(path)
        for key, info in header.items():
            where[key] = (path, start, info)
    for key, tensor in module.state_dict().items():
        if key in where and list(where[key][2]["shape"]) != list(tensor.shape):
            return None

    def read(name: str) -> torch.Tensor | None:
        if name not in where:
            return None
        path, start, info = where[name]
        begin, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        if end > begin:
            with open(path, "rb") as handle:
                handle.seek(start + begin)
                handle.readinto(tensor.view(-1).view(torch.uint8).numpy())
        return tensor

    return read


def remap(module: nn.Module) -> bool:
    """Re-point every weight of a frozen, unmodified `module` at a fresh map of its files.

    Refuses (False) when the files do not match the module or the first/last value of any tensor
    differs (the module was changed after loading: remapping would undo that).
    """
    files = weight_files(module)
    if files is None or any(p.requires_grad for p in module.parameters()):
        return False
    fresh: dict[str, torch.Tensor] = {}
    for path in files:
        fresh.update(load_file(str(path)))
    own = module.state_dict()
    for key, tensor in own.items():
        new = fresh.get(key)
        if new is None or new.dtype != tensor.dtype or new.shape != tensor.shape:
            return False
        if tensor.numel() and not torch.equal(new.view(-1)[[0, -1]], tensor.view(-1)[[0, -1]]):
            return False
    module.load_state_dict({key: fresh[key] for key in own}, assign=True)
    return True


def cast_from_files(module: nn.Module, dtype: torch.dtype) -> bool:
    """Cast a module loaded from its safetensors files to `dtype` one tensor at a time, each read from the files
    into its own buffer. `module.to(dtype)` instead reads every page of the memory map, and those pages stay
    resident until the last tensor of the file is replaced: fp32 file + bf16 copy = 6 bytes a parameter at the
    peak, against 2 bytes + one fp32 tensor here. False (nothing done) when the module has no matching files or
    already has `dtype`."""
    tensors = module.state_dict(keep_vars=True)  # parameters and persistent buffers, the objects themselves
    if all(t.dtype == dtype for t in tensors.values() if t.is_floating_point()):
        return False
    reader = tensor_reader(module)
    if reader is None:
        return False
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and tensor.dtype != dtype:
                fresh = reader(name)  # None: not in the files (tied or computed); cast the module's own
                tensor.data = (fresh if fresh is not None else tensor.data).to(dtype)
    return True
