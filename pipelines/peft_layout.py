"""The peft layout of prompt-family adapters (prompt, prefix and P-tuning, LLaMA-Adapter), both directions.

Weight adapters (LoRA, DoRA, LoHa, LoKr, IA3) go through `personalize.formats` (save_adapter /
read_adapter); prompt adapters hold one tensor, `prompt_embeddings`, and an adapter_config.json:

    PROMPT_TUNING  prompt_embeddings (n, hidden); token_dim = hidden, num_attention_heads = heads
    PREFIX_TUNING  prompt_embeddings (n, L * 2 * kv_heads * head_dim), no projection MLP;
                   GQA models: token_dim = kv_heads * head_dim, num_attention_heads = kv_heads (as peft)
    P_TUNING       prompt_embeddings (n, hidden): the encoder's output (peft's inference-mode file)
    ADAPTION_PROMPT <attention path>.adaption_prompt (1, adapter_len, hidden) and .adaption_gate (1,)
                   in the top `adapter_layers` attention layers
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PROMPT_TYPES = {"prompt-tuning": "PROMPT_TUNING", "prefix-tuning": "PREFIX_TUNING"}
READ_TYPES = {**PROMPT_TYPES, "p-tuning": "P_TUNING"}  # P-tuning's file holds the prompt as prompt tuning's
PEFT_PREFIX = "base_model.model."
STATE_KEY = "prompt_embeddings"


def prompt_config(model: Any, method: str, num_virtual_tokens: int) -> dict[str, Any]:
    """The method part of adapter_config.json for `model` (its text config, for a multimodal one)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    token_dim = config.hidden_size
    if method == "prefix-tuning":
        heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        token_dim = heads * head_dim
    out = {"peft_type": PROMPT_TYPES[method], "num_virtual_tokens": num_virtual_tokens, "token_dim": token_dim}
    out.update(num_attention_heads=heads, num_layers=config.num_hidden_layers, num_transformer_submodules=1)
    if method == "prefix-tuning":
        out.update(encoder_hidden_size=token_dim, prefix_projection=False)
    else:
        out.update(prompt_tuning_init="RANDOM")
    return out


def _config(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder).expanduser() / PEFT_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def prompt_method(folder: str | Path) -> tuple[str, int] | None:
    """(method, num_virtual_tokens) when `folder` holds a peft prompt/prefix/P-tuning adapter, else None."""
    config = _config(folder)
    methods = {peft_type: method for method, peft_type in READ_TYPES.items()}
    if config is None or config.get("peft_type") not in methods:
        return None
    return methods[config["peft_type"]], int(config["num_virtual_tokens"])


def read_prompt(folder: str | Path) -> dict[str, torch.Tensor]:
    """The canonical state dict ({"prompt_embeddings": (n, d)}) of a prompt adapter folder."""
    from safetensors.torch import load_file

    return {STATE_KEY: load_file(str(Path(folder).expanduser() / PEFT_FILE))[STATE_KEY]}


def adaption_prompt(folder: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]] | None:
    """(llama-adapter options, canonical state dict) when `folder` holds peft's ADAPTION_PROMPT, else None."""
    from safetensors.torch import load_file

    config = _config(folder)
    if config is None or config.get("peft_type") != "ADAPTION_PROMPT":
        return None
    tensors = load_file(str(Path(folder).expanduser() / PEFT_FILE))
    options = {"adapter_len": int(config["adapter_len"]), "adapter_layers": int(config["adapter_layers"])}
    return options, {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
