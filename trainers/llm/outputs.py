"""Writing an LLM/VLM adapter in the peft layout (`adapter_config.json` + `adapter_model.safetensors`).

Stock peft loads the folder: `PeftModel.from_pretrained(base_model, folder)`. Weight adapters go
through `personalize.formats.save_adapter`; Delta-LoRA and IncreLoRA are saved as the LoRA they are
equivalent to; AdaLoRA in peft's ADALORA layout, LLaMA-Adapter in its ADAPTION_PROMPT layout; prompt tuning, prefix
tuning and P-tuning (one tensor: P-tuning's encoded prompt, as peft saves it) are written here;
methods peft does not have (MPO, ...) in personalize's own file (`personalize.adapters.native`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from personalize.pipelines.peft_layout import PEFT_CONFIG, PEFT_FILE, PROMPT_TYPES, STATE_KEY, prompt_config
from personalize.trainers.llm.config import LLM_METHODS

AS_LORA = ("delta-lora", "increlora")  # methods whose trained result is a plain LoRA
PEFT_WRITTEN = ("lora", "dora", "loha", "lokr", "ia3", "prompt-tuning", "prefix-tuning", "adalora", "p-tuning")
PEFT_WRITTEN += ("llama-adapter", "vera", "oft", "boft", *AS_LORA)
# peft's forms of these hold one block size, one butterfly stage, one shared pair of matrices
CONSTRAINED = ("oft", "boft", "vera")
# no other tool has them: personalize's own file (adapters.load_native reads it)
NATIVE = tuple(method for method in LLM_METHODS if method not in PEFT_WRITTEN)


def save_adapter(
    folder: Path,
    model: Any,
    sd: dict[str, torch.Tensor],
    *,
    method: str,
    hyper: dict[str, Any],
    base_model: str,
    name: str = "default",
) -> list[Path]:
    """Write the peft layout into `folder` (each file atomically); returns the paths."""
    family = "vlm" if "ForConditionalGeneration" in type(model).__name__ else "llm"
    task_type = "CAUSAL_LM" if family == "llm" else None
    if method in NATIVE:
        from personalize.adapters import save_native

        return [save_native(folder, model, name, method, hyper)]
    if method == "adalora":
        from personalize.formats.peft import adalora_to_peft

        tensors, config = adalora_to_peft(sd, hyper, base_model=base_model, task_type=task_type)
        return _write(Path(folder), tensors, config)
    if method == "llama-adapter":
        from personalize.formats.peft import adaption_prompt_to_peft

        tensors, config = adaption_prompt_to_peft(sd, base_model=base_model, task_type=task_type)
        return _write(Path(folder), tensors, config)
    if method not in (*PROMPT_TYPES, "p-tuning"):  # (NATIVE ones returned above)
        from personalize.formats import save_adapter as save_formats

        if method == "increlora":
            from personalize.adapters.increlora import increlora_to_lora

            sd = increlora_to_lora(sd)
        return save_formats(
            folder,
            {"model": sd},
            method="lora" if method in AS_LORA else method,
            family=family,
            hyper=hyper,
            base_model=base_model,
            model=model,
        )
    prompt_part = prompt_config(model, "prompt-tuning" if method == "p-tuning" else method, len(sd[STATE_KEY]))
    if method == "p-tuning":
        from personalize.formats.peft import p_tuning_config

        prompt_part = p_tuning_config(prompt_part, hyper)
    config = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True, **prompt_part}
    return _write(Path(folder), {STATE_KEY: sd[STATE_KEY]}, config)


def check_writable(model: Any, method: str, name: str) -> None:
    """Convert the freshly injected adapter of a CONSTRAINED method to peft's layout (a UserError if it
    cannot be): before training, so that no run is lost to a file that cannot be written."""
    if method in CONSTRAINED:
        from personalize.adapters import state_dict
        from personalize.formats.peft import to_peft

        to_peft(state_dict(model, name))


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    weights, config_path = folder / PEFT_FILE, folder / PEFT_CONFIG
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}
    save_file(tensors, str(weights.with_name(weights.name + ".partial")), metadata={"format": "pt"})
    weights.with_name(weights.name + ".partial").replace(weights)
    config_path.with_name(config_path.name + ".partial").write_text(json.dumps(config, indent=2, sort_keys=True))
    config_path.with_name(config_path.name + ".partial").replace(config_path)
    return [weights, config_path]
