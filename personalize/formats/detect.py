"""Which layout a file or folder holds, and reading files (safetensors; pickle only with an explicit opt-in)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from personalize.adapters.from_weights import PARAM_NAMES
from personalize.errors import UserError
from personalize.formats import diffusers, embeddings, kohya, peft

PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
SELECTIVE_FILE = "adapter.safetensors"  # bitfit / norm runs: "<component>.<parameter name>" -> trained value
COMPONENT_HEADS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "model")


def is_canonical_key(key: str) -> bool:
    """ "<component>.<module path>.<param>" with the injection core's parameter names (our own raw files)."""
    head, _, rest = key.partition(".")
    return head in COMPONENT_HEADS and any(rest.endswith("." + p) for p in PARAM_NAMES)


def layout_of(data: Mapping[str, Any], where: str = "") -> str:
    """'diffusers' | 'kohya' | 'peft' | 'embedding' from the keys; anything else is an error showing them."""
    keys = list(data)
    if keys and all(k.startswith(peft.PREFIX) for k in keys):
        return "peft"
    if keys and all(kohya.is_kohya_key(k) for k in keys):
        return "kohya"
    if keys and all(diffusers.is_diffusers_key(k) for k in keys):
        return "diffusers"
    if keys and all(is_canonical_key(k) for k in keys):
        return "canonical"
    if embeddings.is_embedding_dict(data):
        return "embedding"
    if keys and all(any(k.startswith(p + "_") for p in kohya.READ_PREFIXES) for k in keys):
        params = sorted({k.partition(".")[2] for k in keys} - set(kohya.PARAMS))
        raise UserError(
            f"{where or 'this file'} is a kohya/LyCORIS file with parameters this toolkit does not read: "
            f"{', '.join(params[:4])} (Tucker LoCon lora_mid, OFT, full diff, ...); supported: LoRA/LoCon/DoRA, "
            "LoHa, LoKr, IA3"
        )
    shown = ", ".join(sorted(keys)[:4]) if keys else "no keys"
    raise UserError(
        f"{where or 'this file'} is not an adapter layout this toolkit reads (diffusers, kohya/LyCORIS, peft, "
        f"embeddings); keys seen: {shown}"
    )


def selective_method(metadata: Mapping[str, str]) -> str | None:
    """'bitfit' / 'norm' / 'unfreeze' for a selective file of ours, 'full' for a full fine-tune's weights
    (both are trained values of named parameters; from the `personalize` metadata), 'difffit' for DiffFit
    (those plus its gamma layers), else None."""
    from personalize.adapters.selective import SELECTIVE_METHODS

    try:
        method = json.loads(metadata.get("personalize", "{}")).get("method")
    except (ValueError, AttributeError):
        return None
    return method if method in (*SELECTIVE_METHODS, "full", "difffit") else None


def read_tensors(path: Path, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors or nested dict, safetensors metadata) of one file."""
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            return dict(load_file(str(path))), metadata
        except Exception as error:  # safetensors raises its own error types
            raise UserError(f"cannot read {path}: {error}") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UserError(
                f"{path.name} is a pickle file, which can run code when loaded; convert it to .safetensors, or pass "
                "--allow-pickle (read with weights_only=True) if you trust it"
            )
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"cannot read {path} with weights_only=True: {str(error).splitlines()[0][:200]}") from None
        if not isinstance(data, Mapping):
            raise UserError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
        return dict(data.get("state_dict", data)), {}
    raise UserError(f"{path.name}: unknown file type; expected .safetensors (or .pt/.bin with --allow-pickle)")


def read_peft_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / peft.CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {folder / peft.CONFIG_FILE}: {error}") from None


def folder_files(folder: Path) -> tuple[tuple[str, Path] | None, list[Path]]:
    """((layout, adapter file or peft folder) or None, embedding files) in one of our/diffusers/peft folders."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    if (folder / peft.CONFIG_FILE).is_file():
        return ("peft", folder), _embedding_files(folder)
    if (folder / diffusers.DIFFUSERS_FILE).is_file():
        return ("diffusers", folder / diffusers.DIFFUSERS_FILE), _embedding_files(folder)
    candidates = []
    for file in sorted(folder.glob("*.safetensors")):
        if file.name in (embeddings.EMBEDS_FILE, embeddings.EMBEDS_FILE_2):
            continue
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
        if keys and all(kohya.is_kohya_key(k) for k in keys):
            candidates.append(("kohya", file))
        elif keys and all(is_canonical_key(k) for k in keys):
            candidates.append(("canonical", file))
    if len(candidates) > 1:
        shown = ", ".join(f.name for _, f in candidates[:3])
        raise UserError(f"{folder} holds {len(candidates)} adapter files ({shown}); pass one file")
    adapter = candidates[0] if candidates else None
    found = _embedding_files(folder)
    if adapter is None and not found:
        shown = ", ".join(sorted(p.name for p in folder.iterdir())[:5]) or "nothing"
        raise UserError(f"{folder} holds no adapter or embedding file this toolkit reads (found: {shown})")
    return adapter, found


def _embedding_files(folder: Path) -> list[Path]:
    return [folder / name for name in (embeddings.EMBEDS_FILE, embeddings.EMBEDS_FILE_2) if (folder / name).is_file()]
