"""LLM/VLM adapters in the peft layout (`adapter_config.json` + `adapter_model.safetensors`).

Stock peft loads the folder: `PeftModel.from_pretrained(base_model, folder)`; the key conversion is
`personalize.pipelines.peft_layout.to_peft`. `save_adapter` is the one function that writes
them (`personalize.formats.save_adapter` takes over when it lands).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from personalize.pipelines.peft_layout import PEFT_CONFIG, PEFT_FILE, PEFT_TYPES, to_peft


def prompt_config(model: Any, method: str, num_virtual_tokens: int) -> dict[str, Any]:
    """PROMPT_TUNING / PREFIX_TUNING fields (GQA models: token_dim = kv_heads * head_dim, as peft)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    token_dim = config.hidden_size
    if method == "prefix-tuning":
        heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        token_dim = heads * head_dim
    out = {"num_virtual_tokens": num_virtual_tokens, "token_dim": token_dim, "num_attention_heads": heads}
    out.update(num_layers=config.num_hidden_layers, num_transformer_submodules=1)
    if method == "prefix-tuning":
        out.update(encoder_hidden_size=token_dim, prefix_projection=False)
    else:
        out.update(prompt_tuning_init="RANDOM")
    return out


def save_adapter(
    folder: Path, model: Any, sd: dict[str, torch.Tensor], *, method: str, hyper: dict[str, Any], base_model: str
) -> list[Path]:
    """Write the peft layout into `folder` (atomically per file); returns the paths."""
    tensors, method_config = to_peft(sd, method, hyper)
    if method in ("prompt-tuning", "prefix-tuning"):
        method_config = prompt_config(model, method, int(hyper.get("num_virtual_tokens", 20)))
    causal = "ForConditionalGeneration" not in type(model).__name__
    config = {
        "peft_type": PEFT_TYPES[method],
        "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        **method_config,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config_path = folder / PEFT_FILE, folder / PEFT_CONFIG
    cpu = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}
    save_file(cpu, str(weights.with_name(weights.name + ".partial")), metadata={"format": "pt"})
    weights.with_name(weights.name + ".partial").replace(weights)
    config_path.with_name(config_path.name + ".partial").write_text(json.dumps(config, indent=2, sort_keys=True))
    config_path.with_name(config_path.name + ".partial").replace(config_path)
    return [weights, config_path]
