"""Writing an LLM/VLM adapter in the peft layout (`adapter_config.json` + `adapter_model.safetensors`).

Stock peft loads the folder: `PeftModel.from_pretrained(base_model, folder)`. Weight adapters go
through `personalize.formats.save_adapter`; prompt and prefix tuning (one tensor) are written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from personalize.pipelines.peft_layout import PEFT_CONFIG, PEFT_FILE, PROMPT_TYPES, STATE_KEY, prompt_config


def save_adapter(
    folder: Path, model: Any, sd: dict[str, torch.Tensor], *, method: str, hyper: dict[str, Any], base_model: str
) -> list[Path]:
    """Write the peft layout into `folder` (each file atomically); returns the paths."""
    family = "vlm" if "ForConditionalGeneration" in type(model).__name__ else "llm"
    if method not in PROMPT_TYPES:
        from personalize.formats import save_adapter as save_formats

        return save_formats(
            folder, {"model": sd}, method=method, family=family, hyper=hyper, base_model=base_model, model=model
        )
    config = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        **prompt_config(model, method, int(sd[STATE_KEY].shape[0])),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config_path = folder / PEFT_FILE, folder / PEFT_CONFIG
    tensors = {STATE_KEY: sd[STATE_KEY].detach().to("cpu", torch.float32).contiguous()}
    save_file(tensors, str(weights.with_name(weights.name + ".partial")), metadata={"format": "pt"})
    weights.with_name(weights.name + ".partial").replace(weights)
    config_path.with_name(config_path.name + ".partial").write_text(json.dumps(config, indent=2, sort_keys=True))
    config_path.with_name(config_path.name + ".partial").replace(config_path)
    return [weights, config_path]
