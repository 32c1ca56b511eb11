"""Target presets per model kind: which layers an adapter wraps when `targets` names a preset.

Each preset is a list of regexes matched with `re.fullmatch` against module paths (never substrings).
The kind comes from the model's class, so the same preset name means the right layers on a UNet, a
DiT, a text encoder, an LLM or a VLM.
"""

from __future__ import annotations

from torch import nn

from personalize.config import nearest
from personalize.errors import UserError

_UNET_ATTENTION = [r"(.*\.)?attn[12]\.(to_q|to_k|to_v|to_out\.0)"]
_UNET_FF = [r"(.*\.)?ff\.net\.(0\.proj|2)", r"(.*\.)?attentions\.\d+\.(proj_in|proj_out)"]
_UNET_CONV = [
    r"(.*\.)?resnets\.\d+\.(conv1|conv2|conv_shortcut)",
    r"(.*\.)?(downsamplers|upsamplers)\.0\.conv",
]
_CLIP = [r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"(.*\.)?mlp\.(fc1|fc2)"]
_T5 = [r"(.*\.)?SelfAttention\.(q|k|v|o)", r"(.*\.)?DenseReluDense\.(wi|wi_0|wi_1|wo)"]
_DIT_ATTENTION = [r"(.*\.)?attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"]
_DIT_FF = [
    r"(.*\.)?(ff|ff_context)\.net\.(0\.proj|2)",
    r"(.*\.)?single_transformer_blocks\.\d+\.(proj_mlp|proj_out)",
]
_LLM_ATTENTION = [r"(.*\.)?(self_attn|attention)\.(q_proj|k_proj|v_proj|o_proj)"]
_LLM_ALL_LINEAR = [r"(?!(.*\.)?lm_head$).*"]  # every Linear except the output head
_VLM_LANGUAGE = [r"(.*\.)?language_model\..*"]
_VLM_PROJECTOR = [r"(.*\.)?multi_modal_projector\..*"]
_VLM_VISION = [r"(.*\.)?vision_tower\..*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"]

PRESETS: dict[str, dict[str, list[str]]] = {
    "unet": {
        "attention": _UNET_ATTENTION,
        "attention+ff": _UNET_ATTENTION + _UNET_FF,
        "conv": _UNET_CONV,
        "all": _UNET_ATTENTION + _UNET_FF + _UNET_CONV,
    },
    "dit": {"attention": _DIT_ATTENTION, "attention+ff": _DIT_ATTENTION + _DIT_FF, "all": _DIT_ATTENTION + _DIT_FF},
    "clip": {"text": _CLIP, "attention": _CLIP[:1], "all": _CLIP},
    "t5": {"text": _T5, "attention": _T5[:1], "all": _T5},
    "llm": {"all-linear": _LLM_ALL_LINEAR, "attention": _LLM_ATTENTION},
    "vlm": {
        "language": _VLM_LANGUAGE,
        "language+projector": _VLM_LANGUAGE + _VLM_PROJECTOR,
        "all": _VLM_LANGUAGE + _VLM_PROJECTOR + _VLM_VISION,
        "all-linear": _VLM_LANGUAGE + _VLM_PROJECTOR + _VLM_VISION,
    },
}


def model_kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name.startswith("UNet") or name == "ControlNetModel":
        return "unet"
    if name in ("SD3Transformer2DModel", "FluxTransformer2DModel") or "Transformer2D" in name:
        return "dit"
    if name.startswith("CLIPText"):
        return "clip"
    if name.startswith("T5"):
        return "t5"
    if "ForConditionalGeneration" in name and hasattr(model, "get_image_features"):
        return "vlm"
    return "llm"


def presets_of(model: nn.Module) -> dict[str, list[str]]:
    """A described DiT family's own presets (personalize.models.families), else its kind's."""
    from personalize.models.families import family_of_module

    described = family_of_module(model)
    if described is not None:
        return {**described.targets, "all": described.targets["all-linear"]}
    return PRESETS[model_kind(model)]


def preset_names(model: nn.Module) -> list[str]:
    return list(presets_of(model))


def is_preset(model: nn.Module, name: str) -> bool:
    return name in all_preset_names() and name in presets_of(model)


def preset_patterns(model: nn.Module, name: str) -> list[str]:
    presets = presets_of(model)
    if name not in presets:
        names = list(presets)
        raise UserError(
            f"target preset '{name}' does not exist for a {type(model).__name__}{nearest(name, names)}; "
            f"presets: {', '.join(names)}"
        )
    return presets[name]


def all_preset_names() -> set[str]:
    from personalize.models.families import FLOW_FAMILIES

    names = {name for presets in PRESETS.values() for name in presets}
    return names | {name for family in FLOW_FAMILIES.values() for name in family.targets}
