"""The peft layout of LLM/VLM adapters, both directions, as pure functions on state dicts.

    LoRA   <path>.lora_down.weight / lora_up.weight / alpha  <-> base_model.model.<path>.lora_A/B.weight
           (+ DoRA dora_scale (out, 1) <-> lora_magnitude_vector (out,)); lora_alpha = effective alpha
    LoHa   hada_w1_a ... (same names and shapes in peft)      <-> base_model.model.<path>.hada_*
    LoKr   lokr_w1, lokr_w2_a, ... (same names)                <-> base_model.model.<path>.lokr_*
    IA3    weight w (offset from 1), on_input                  <-> ia3_l = 1 + w, (out, 1) or (1, in)
    prompt/prefix tuning: prompt_embeddings                    <-> prompt_embeddings
The canonical side is the injection core's `adapters.state_dict` layout.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError

PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
PEFT_TYPES = {
    "lora": "LORA",
    "dora": "LORA",
    "loha": "LOHA",
    "lokr": "LOKR",
    "ia3": "IA3",
    "prompt-tuning": "PROMPT_TUNING",
    "prefix-tuning": "PREFIX_TUNING",
}


def _by_module(sd: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        for name in names:
            if key.endswith("." + name):
                modules[key[: -len(name) - 1]][name] = value
                break
        else:
            raise UserError(f"unexpected adapter key {key} for the peft layout")
    return dict(modules)


def _patterns(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The most common value and the modules that differ from it (peft's rank/alpha patterns)."""
    counts: dict[float, int] = defaultdict(int)
    for value in values.values():
        counts[value] += 1
    common = max(counts, key=lambda v: counts[v])
    return common, {f"^{path}$": value for path, value in values.items() if value != common}


def to_peft(sd: dict[str, torch.Tensor], method: str, hyper: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Canonical state dict -> (peft tensors, method part of adapter_config.json)."""
    if method in ("prompt-tuning", "prefix-tuning"):
        return {"prompt_embeddings": sd["prompt_embeddings"]}, {}
    if method in ("lora", "dora"):
        modules = _by_module(sd, ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"))
        tensors: dict[str, torch.Tensor] = {}
        for path, parts in modules.items():
            tensors[f"{PREFIX}{path}.lora_A.weight"] = parts["lora_down.weight"]
            tensors[f"{PREFIX}{path}.lora_B.weight"] = parts["lora_up.weight"]
            if "dora_scale" in parts:
                tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = parts["dora_scale"].reshape(-1)
        ranks = {path: parts["lora_down.weight"].shape[0] for path, parts in modules.items()}
        alphas = {path: float(parts["alpha"]) for path, parts in modules.items()}
        r, rank_pattern = _patterns(ranks)  # type: ignore[arg-type]
        alpha, alpha_pattern = _patterns(alphas)
        config = {"r": int(r), "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
        config.update(use_dora=method == "dora", lora_dropout=float(hyper.get("dropout", 0.0)), bias="none")
        return tensors, {**config, "target_modules": sorted(modules)}
    if method in ("loha", "lokr"):
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
        if method == "lokr":
            names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        modules = _by_module(sd, (*names, "alpha"))
        tensors = {f"{PREFIX}{path}.{name}": value for path, parts in modules.items() for name, value in parts.items()}
        tensors = {key: value for key, value in tensors.items() if not key.endswith(".alpha")}
        rank = int(hyper.get("rank", 8))
        alpha, alpha_pattern = _patterns({path: float(parts["alpha"]) for path, parts in modules.items()})
        config = {"r": rank, "alpha": alpha, "alpha_pattern": alpha_pattern, "rank_pattern": {}}
        if method == "lokr":
            config.update(
                decompose_factor=int(hyper.get("factor", -1)), decompose_both=hyper.get("decompose_both", False)
            )
        return tensors, {**config, "target_modules": sorted(modules)}
    if method == "ia3":
        modules = _by_module(sd, ("weight", "on_input"))
        tensors, inputs = {}, []
        for path, parts in modules.items():
            vector = 1.0 + parts["weight"]
            if bool(parts["on_input"]):
                inputs.append(path)
                tensors[f"{PREFIX}{path}.ia3_l"] = vector.reshape(1, -1)  # (1, in)
            else:
                tensors[f"{PREFIX}{path}.ia3_l"] = vector.reshape(-1, 1)  # (out, 1)
        return tensors, {"target_modules": sorted(modules), "feedforward_modules": sorted(inputs)}
    raise UserError(f"{method} adapters have no peft layout")


def from_peft(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    """(method, canonical state dict) from a peft adapter's tensors and adapter_config.json."""
    peft_type = config.get("peft_type")
    if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING"):
        return peft_type.lower().replace("_", "-"), {"prompt_embeddings": tensors["prompt_embeddings"]}
    body = {key[len(PREFIX) :] if key.startswith(PREFIX) else key: value for key, value in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    if peft_type == "LORA":
        rank, alpha = config["r"], float(config["lora_alpha"])
        for key, value in body.items():
            if key.endswith(".lora_A.weight"):
                path = key[: -len(".lora_A.weight")]
                r = int(config.get("rank_pattern", {}).get(f"^{path}$", value.shape[0] if rank is None else rank))
                a = float(config.get("alpha_pattern", {}).get(f"^{path}$", alpha))
                if config.get("use_rslora"):
                    a = a * r**0.5  # the core stores the effective alpha (scale = alpha / r)
                out[f"{path}.lora_down.weight"] = value
                out[f"{path}.lora_up.weight"] = body[f"{path}.lora_B.weight"]
                out[f"{path}.alpha"] = torch.tensor(a)
            elif key.endswith(".lora_magnitude_vector"):
                out[f"{key[: -len('.lora_magnitude_vector')]}.dora_scale"] = value.reshape(-1, 1)
        return ("dora" if config.get("use_dora") else "lora"), out
    if peft_type in ("LOHA", "LOKR"):
        paths = {key.rsplit(".", 1)[0] for key in body}
        for path in paths:
            out[f"{path}.alpha"] = torch.tensor(
                float(config.get("alpha_pattern", {}).get(f"^{path}$", config["alpha"]))
            )
        return peft_type.lower(), {**body, **out}
    if peft_type == "IA3":
        inputs = set(config.get("feedforward_modules") or [])
        for key, value in body.items():
            path = key[: -len(".ia3_l")]
            out[f"{path}.weight"] = value.reshape(-1) - 1.0
            out[f"{path}.on_input"] = torch.tensor(path in inputs or any(path.endswith("." + m) for m in inputs))
        return "ia3", out
    raise UserError(f"peft adapters of type {peft_type} are not supported; use lora, loha, lokr, ia3 or prompt methods")


def read_peft_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter_config) of a peft adapter folder (safetensors only)."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    weights, config = folder / PEFT_FILE, folder / PEFT_CONFIG
    if not weights.is_file() or not config.is_file():
        raise UserError(f"{folder} is not a peft adapter folder (needs {PEFT_FILE} and {PEFT_CONFIG})")
    return load_file(str(weights)), json.loads(config.read_text())
