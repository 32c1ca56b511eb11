"""Resumable training checkpoints: safetensors only, written atomically, the last K kept.

A checkpoint is a folder `checkpoints/step-000120/` holding `state.safetensors` (trainable
weights, optimizer tensors, EMA shadow, RNG states; the non-tensor parts -- optimizer param
groups, LR-scheduler state, loop position -- as JSON in the file's metadata) and one
`rng-rank<r>.safetensors` per process. It is written into `step-000120.partial/` and renamed
when complete, so a killed run never leaves a half checkpoint that `--resume` would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (partial folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and STEP_DIR.match(path.name)]
    return sorted(found, key=lambda path: int(STEP_DIR.match(path.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# --- optimizer state <-> flat tensors + JSON ------------------------------------------------


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> ({"<param id>.<name>": tensor}, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, values in state["state"].items():
        scalars[str(param_id)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().clone()
            else:
                scalars[str(param_id)][name] = value
    return tensors, {"param_groups": state["param_groups"], "state": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(param_id): dict(values) for param_id, values in rest["state"].items()}
    for key, tensor in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = tensor
    return {"state": state, "param_groups": rest["param_groups"]}


# --- RNG ------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{index}"] = cuda_state
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        cuda_states = [state[key] for key in sorted(state) if key.startswith("cuda.")]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


# --- save / load ----------------------------------------------------------------------------


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value.detach().contiguous().cpu().clone() for key, value in tensors.items()}


def _split(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


def write_state(
    folder: Path,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    loop: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The shared state (main process only) into `folder/state.safetensors`."""
    optimizer_tensors, optimizer_rest = flatten_optimizer(optimizer)
    tensors = {**_prefixed("model", model), **_prefixed("optimizer", optimizer_tensors)}
    if ema is not None:
        tensors.update(_prefixed("ema", ema))
    metadata = {
        "optimizer": json.dumps(optimizer_rest),
        "scheduler": json.dumps(scheduler),
        "loop": json.dumps(loop),
        "format": "personalize-checkpoint-1",
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "state.safetensors"), metadata=metadata)
    return folder / "state.safetensors"


def write_rng(folder: Path, rank: int, generator: torch.Generator | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rng-rank{rank}.safetensors"
    save_file(_prefixed("rng", rng_state(generator)), str(path))
    return path


def partial_dir(root: Path, step: int) -> Path:
    return checkpoint_dir(root, step).with_name(checkpoint_dir(root, step).name + ".partial")


def publish(root: Path, step: int, keep: int) -> Path:
    """Rename the finished partial folder into place, then drop all but the newest `keep`."""
    final = checkpoint_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    partial_dir(root, step).rename(final)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict[str, Any]:
    """Inverse of write_state: {"model", "optimizer", "scheduler", "loop", "ema"}."""
    from safetensors import safe_open

    path = Path(folder) / "state.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    ema = _split("ema", tensors)
    return {
        "model": _split("model", tensors),
        "optimizer": unflatten_optimizer(_split("optimizer", tensors), json.loads(metadata["optimizer"])),
        "scheduler": json.loads(metadata["scheduler"]),
        "loop": json.loads(metadata["loop"]),
        "ema": ema or None,
    }


def read_rng(folder: Path, rank: int) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / f"rng-rank{rank}.safetensors"
    return _split("rng", load_file(str(path))) if path.is_file() else None
