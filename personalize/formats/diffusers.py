"""diffusers LoRA layout (`pytorch_lora_weights.safetensors`) <-> canonical component dicts.

Written keys: "<component>.<module path>.lora_A.weight" (= lora_down), ".lora_B.weight" (= lora_up) and, for
DoRA, ".lora_magnitude_vector" (peft's shape: (out,) on Linear, (1, out, 1, 1) on Conv2d). The scale
alpha / r travels in the safetensors metadata `lora_adapter_metadata`: a JSON of LoraConfig arguments per
component ("unet.r", "unet.lora_alpha", "unet.rank_pattern", ...), which stock `load_lora_weights` reads.
Read also: the older "lora.down/lora.up", "lora_linear_layer.down/up" and attention-processor
("processor.to_q_lora.down") keys, and per-module ".alpha" tensors. No alpha anywhere means scale 1.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from personalize.adapters import group_by_module
from personalize.errors import UserError
from personalize.formats.canonical import Components, alpha_of, method_of, rank_of

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# Suffix of a foreign key -> canonical parameter name (longest first).
_PARAMS = (
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".alpha", "alpha"),
)
# Attention-processor keys of diffusers < 0.20: "attn1.processor.to_q_lora.down.weight".
_PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_PROCESSOR_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def is_diffusers_key(key: str) -> bool:
    return _PROCESSOR.fullmatch(key) is not None or any(key.endswith(s) for s, _ in _PARAMS[:-1])


def peft_magnitude(dora_scale: torch.Tensor) -> torch.Tensor:
    """Our (out, 1[, 1, 1]) DoRA magnitude -> peft's (out,) for Linear, (1, out, 1, 1) for Conv2d."""
    flat = dora_scale.reshape(-1)
    return flat if dora_scale.dim() == 2 else flat.reshape(1, -1, 1, 1)


def canonical_magnitude(magnitude: torch.Tensor, conv: bool) -> torch.Tensor:
    flat = magnitude.reshape(-1, 1)
    return flat.reshape(-1, 1, 1, 1) if conv else flat


def lora_config(ranks: Mapping[str, int], alphas: Mapping[str, float], dora: bool) -> dict[str, Any]:
    """LoraConfig arguments reproducing per-module ranks and alphas (exact-path patterns)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {"^" + re.escape(p): v for p, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {"^" + re.escape(p): v for p, v in sorted(alphas.items()) if v != alpha},
        "use_dora": dora,
    }


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """What a peft rank/alpha pattern gives for `path` (peft matches `(.*\\.)?(pattern)$`)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def to_diffusers(components: Components) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Canonical component dict -> (tensors, safetensors metadata) in the diffusers layout."""
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for component, sd in components.items():
        groups = group_by_module(sd)
        if not groups:
            continue
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for path, group in groups.items():
            method = method_of(group)
            if method not in ("lora", "dora"):
                raise UserError(
                    f"the diffusers layout holds LoRA/LoCon/DoRA only, but {component}.{path} is {method}; "
                    "write the kohya layout (--to kohya) or approximate it as a LoRA (--to lora-svd)"
                )
            key = f"{component}.{path}"
            tensors[f"{key}.lora_A.weight"] = group["lora_down.weight"].contiguous()
            tensors[f"{key}.lora_B.weight"] = group["lora_up.weight"].contiguous()
            if "dora_scale" in group:  # transformers' peft loader wants the ".weight" of the magnitude module
                suffix = ".weight" if component.startswith("text_encoder") else ""
                tensors[f"{key}.lora_magnitude_vector{suffix}"] = peft_magnitude(group["dora_scale"]).contiguous()
            ranks[path], alphas[path] = rank_of(group) or 0, alpha_of(group) or 0.0
        dora = any("dora_scale" in group for group in groups.values())
        if dora and not all("dora_scale" in group for group in groups.values()):
            raise UserError(f"{component}: DoRA on some modules but not others cannot be written in one LoraConfig")
        config.update({f"{component}.{k}": v for k, v in lora_config(ranks, alphas, dora).items()})
    return tensors, {METADATA_KEY: json.dumps(config, sort_keys=True), "format": "pt"}


def _canonical_key(key: str) -> tuple[str, str]:
    """Foreign key -> ("<component>.<module path>", canonical param)."""
    processor = _PROCESSOR.fullmatch(key)
    if processor:
        prefix, target, side = processor.groups()
        return f"{prefix}.{_PROCESSOR_TARGET[target]}", f"lora_{side}.weight"
    for suffix, param in _PARAMS:
        if key.endswith(suffix):
            return key[: -len(suffix)], param
    raise UserError(f"'{key}' is not a diffusers LoRA key (expected .lora_A.weight, .lora_B.weight, ...)")


def _split_component(module: str, components: tuple[str, ...]) -> tuple[str, str]:
    head, _, path = module.partition(".")
    if head not in components:
        raise UserError(
            f"diffusers LoRA key '{module}' does not start with a component ({', '.join(components)}); "
            "is it a kohya or peft file?"
        )
    return head, path


def from_diffusers(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    components: tuple[str, ...] = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"),
) -> Components:
    """diffusers-layout tensors (+ metadata) -> canonical component dict with effective alphas."""
    config = json.loads(metadata[METADATA_KEY]) if metadata and metadata.get(METADATA_KEY) else {}
    out: Components = {}
    for key, value in tensors.items():
        module, param = _canonical_key(key)
        component, path = _split_component(module, components)
        out.setdefault(component, {})[f"{path}.{param}"] = value
    for component, sd in out.items():
        for path, group in group_by_module(sd).items():
            if "lora_down.weight" not in group or "lora_up.weight" not in group:
                raise UserError(f"{component}.{path} has {sorted(group)} but a LoRA needs both down (A) and up (B)")
            if "dora_scale" in group:
                sd[f"{path}.dora_scale"] = canonical_magnitude(
                    group["dora_scale"], group["lora_down.weight"].dim() == 4
                )
            if "alpha" not in group:
                rank = int(group["lora_down.weight"].shape[0])
                alpha = _config_alpha(config, component, path, rank)
                sd[f"{path}.alpha"] = torch.tensor(float(alpha))
            else:
                sd[f"{path}.alpha"] = group["alpha"].reshape(()).float()
    return out


def _config_alpha(config: Mapping[str, Any], component: str, path: str, rank: int) -> float:
    prefix = component + "."
    if prefix + "lora_alpha" not in config:
        return float(rank)  # the diffusers convention without alphas: W + B A (scale 1)
    alpha = pattern_value(config.get(prefix + "alpha_pattern") or {}, path, config[prefix + "lora_alpha"])
    if config.get(prefix + "use_rslora"):
        return float(alpha) * rank**0.5  # stored as effective alpha: alpha/sqrt(r) = alpha_eff/r
    return float(alpha)
