"""Merge inputs: `PATH[:WEIGHT]` specs, read in any layout and staged so that layers stream one at a time.

Each input is read once (any layout `personalize.formats.read_adapter` reads), written to a scratch
safetensors file in canonical keys ("<component>.<module path>.<param>"), and released; the merge then
opens every scratch file memory-mapped and reads one layer of each at a time. Peak memory is one input
file plus one layer per input, not the sum of the inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from personalize.adapters.from_weights import PARAM_NAMES
from personalize.errors import UserError
from personalize.formats.embeddings import Embeddings


@dataclass
class MergeInput:
    path: str
    weight: float = 1.0


@dataclass
class StagedInput:
    source: MergeInput
    file: Path  # canonical scratch file
    modules: dict[str, list[str]]  # "<component>.<module path>" -> its keys in `file`
    metadata: dict[str, str]
    layout: str
    embeddings: Embeddings = field(default_factory=dict)
    family: str = ""


def parse_input(spec: str) -> MergeInput:
    """ "a.safetensors:0.7" -> MergeInput("a.safetensors", 0.7); a path that exists as given wins."""
    path, colon, weight = spec.rpartition(":")
    if not colon or not path or Path(spec).exists():
        return MergeInput(spec)
    try:
        return MergeInput(path, float(weight))
    except ValueError:
        raise UserError(f"'{spec}': the part after ':' must be a number (the merge weight), got '{weight}'") from None


def stage(inputs: list[MergeInput], base: Any, scratch: Path, allow_pickle: bool = False) -> list[StagedInput]:
    """Read every input (names mapped and checked on `base` when given) into a canonical scratch file."""
    from personalize.formats.cli import guess_family
    from personalize.formats.io import read_adapter

    staged = []
    for index, item in enumerate(inputs):
        if not Path(item.path).exists():
            raise UserError(f"merge input {item.path} does not exist")
        found = read_adapter(item.path, base, allow_pickle=allow_pickle)
        tensors = {f"{c}.{k}": v.contiguous() for c, sd in found.components.items() for k, v in sd.items()}
        if not tensors and not found.embeddings:
            raise UserError(f"{item.path} holds no adapter weights")
        file = scratch / f"input-{index}.safetensors"
        save_file(tensors, str(file))
        modules: dict[str, list[str]] = {}
        for key in tensors:
            modules.setdefault(_module_of(key), []).append(key)
        staged.append(
            StagedInput(item, file, modules, found.metadata, found.layout, found.embeddings, guess_family(found))
        )
        del found, tensors
    return staged


def _module_of(key: str) -> str:
    """ "unet.a.b.lora_up.weight" -> "unet.a.b" (the longest known parameter name wins, as in group_by_module)."""
    param = next(p for p in PARAM_NAMES if key.endswith("." + p))
    return key[: -len(param) - 1]


def module_order(staged: list[StagedInput]) -> list[str]:
    """Every module of any input, in first-seen order."""
    return list(dict.fromkeys(m for s in staged for m in s.modules))


class LayerReader:
    """Open every scratch file once; `layer(module)` -> per input: its parameters there, or None."""

    def __init__(self, staged: list[StagedInput]) -> None:
        self.staged = staged
        self.handles: list[Any] = []

    def __enter__(self) -> LayerReader:
        self.handles = [safe_open(str(s.file), framework="pt") for s in self.staged]
        return self

    def __exit__(self, *_: object) -> None:
        self.handles = []

    def layer(self, module: str) -> list[dict[str, torch.Tensor] | None]:
        groups: list[dict[str, torch.Tensor] | None] = []
        for staged, handle in zip(self.staged, self.handles):
            keys = staged.modules.get(module)
            groups.append(None if keys is None else {k[len(module) + 1 :]: handle.get_tensor(k) for k in keys})
        return groups

    def __iter__(self) -> Iterator[str]:
        return iter(module_order(self.staged))
