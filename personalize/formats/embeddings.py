"""Textual Inversion embeddings: diffusers, SDXL clip_l/clip_g and A1111 layouts <-> {token: {component: (n, d)}}.

diffusers   learned_embeds.safetensors {token: (n, d)} (text_encoder),
            learned_embeds_2.safetensors {token: (n, d)} (SDXL text_encoder_2)
SDXL        {"clip_l": (n, 768), "clip_g": (n, 1280)}: one token per file, named by the file
A1111       {"string_to_param": {"*": (n, d)}, "name": ...} (.pt pickle) or {"emb_params": (n, d)}
            (.safetensors); the file name is the trigger word
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from personalize.errors import UserError

EMBEDS_FILE = "learned_embeds.safetensors"
EMBEDS_FILE_2 = "learned_embeds_2.safetensors"
A1111_FOLDER = "a1111"
Embeddings = dict[str, dict[str, torch.Tensor]]
_SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def _rows(tensor: torch.Tensor, where: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2:
        raise UserError(f"embedding {where} has shape {tuple(tensor.shape)}; expected (vectors, dim)")
    return tensor.detach().contiguous()


def file_stem(token: str) -> str:
    """A file name A1111 users can type as the trigger word: '<sks>' -> 'sks'."""
    stem = re.sub(r"[^\w\-]+", "_", token).strip("_")
    return stem or "embedding"


def to_embedding_files(embeddings: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """{token: {component: (n, d)}} -> {relative file name: tensors} for diffusers and A1111/ComfyUI."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    # ED-LoRA's layer-wise tokens ('<tok>', '<tok>@1', ...: personalize.pipelines.layerwise) need a prompt encoded
    # once per cross-attention layer, which A1111/ComfyUI do not do: no A1111 export for them
    layered = {match.group(1) for token in embeddings if (match := re.fullmatch(r"(.+)@\d+", token))}
    for token, parts in embeddings.items():
        unknown = set(parts) - {"text_encoder", "text_encoder_2"}
        if unknown or "text_encoder" not in parts:
            raise UserError(f"embedding '{token}' has parts {sorted(parts)}; expected text_encoder (+ text_encoder_2)")
        files.setdefault(EMBEDS_FILE, {})[token] = _rows(parts["text_encoder"], token)
        if "text_encoder_2" in parts:
            files.setdefault(EMBEDS_FILE_2, {})[token] = _rows(parts["text_encoder_2"], token)
            export = {"clip_l": files[EMBEDS_FILE][token], "clip_g": files[EMBEDS_FILE_2][token]}
        else:
            export = {"emb_params": files[EMBEDS_FILE][token]}
        if token not in layered and re.sub(r"@\d+$", "", token) not in layered:
            files[f"{A1111_FOLDER}/{file_stem(token)}.safetensors"] = export
    return files


def is_embedding_dict(data: Mapping[str, Any]) -> bool:
    """True for the embedding layouts above (and never for adapter weights, whose keys have dots)."""
    if "string_to_param" in data or any(k.startswith("string_to_param.") for k in data):
        return True
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return False
    if set(tensors) <= set(_SDXL_KEYS) | {"emb_params"}:
        return True
    return all(v.dim() <= 2 and "." not in k for k, v in tensors.items())


def from_embedding_dict(data: Mapping[str, Any], name: str, component: str = "text_encoder") -> Embeddings:
    """One loaded file -> {token: {component: (n, d)}}; `name` (the file stem) names single-vector layouts."""
    if "string_to_param" in data or any(k.startswith("string_to_param.") for k in data):
        params = data.get("string_to_param") or {k.split(".", 1)[1]: v for k, v in data.items() if "." in k}
        if not isinstance(params, Mapping) or len(params) != 1:
            raise UserError(f"A1111 embedding '{name}' has {len(params)} vectors sets in string_to_param; expected 1")
        token = data["name"] if isinstance(data.get("name"), str) and data["name"] else name
        return {token: {component: _rows(next(iter(params.values())), token)}}
    if set(data) & set(_SDXL_KEYS):
        missing = set(_SDXL_KEYS) - set(data)
        if missing:
            raise UserError(f"SDXL embedding '{name}' lacks {sorted(missing)}; it needs both clip_l and clip_g")
        return {name: {_SDXL_KEYS[k]: _rows(data[k], f"{name}.{k}") for k in _SDXL_KEYS}}
    if "emb_params" in data:
        return {name: {component: _rows(data["emb_params"], name)}}
    return {token: {component: _rows(value, token)} for token, value in data.items()}


def merge_embeddings(target: Embeddings, more: Embeddings) -> None:
    for token, parts in more.items():
        target.setdefault(token, {}).update(parts)


def check_dims(embeddings: Embeddings, dims: Mapping[str, int]) -> None:
    """Each vector's width must be its text encoder's hidden size."""
    for token, parts in embeddings.items():
        for component, tensor in parts.items():
            if component not in dims:
                raise UserError(f"embedding '{token}' is for {component}, which this pipeline does not have")
            if tensor.shape[-1] != dims[component]:
                raise UserError(
                    f"embedding '{token}' for {component} has shape {tuple(tensor.shape)}, "
                    f"but the text encoder's embeddings are {dims[component]} wide; is it for another base model?"
                )
