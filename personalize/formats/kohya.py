"""kohya / LyCORIS layout (A1111, ComfyUI) <-> canonical component dicts.

Keys: "<prefix>_<module path with . -> _>.<param>", with the canonical parameter names unchanged
(`lora_down.weight`, `lora_up.weight`, `alpha`, `dora_scale`, `hada_*`, `lokr_*`, IA3 `weight`/`on_input`).
Prefixes: UNet `lora_unet`, DiT `lora_transformer`, text encoders `lora_te` (one encoder) or `lora_te1` /
`lora_te2` (SDXL). SDXL UNet names are written in the original SGM blocks (`input_blocks_4_1_...`, what
A1111/ComfyUI expect) and read in both SGM and diffusers-style names; LyCORIS's own `lycoris_` prefix is
read too. A DiT family's `single_file_renames` write the layers ComfyUI maps by original name only as
`lora_unet_<original name>` (formats/original_names.py: all of Wan, a few layers of Flux.2 and Chroma); they
are read back by the same table. Every module is written once, with its weights and its `alpha` (the
effective alpha).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from personalize.adapters import group_by_module
from personalize.adapters.from_weights import PARAM_NAMES
from personalize.errors import UserError
from personalize.formats.canonical import Components, alpha_of, method_of, rank_of
from personalize.formats.original_names import Renames, kohya_name
from personalize.formats.sdxl_names import block_map, to_sgm

if TYPE_CHECKING:
    from personalize.models.families.description import FamilyDescription

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
NETWORK_MODULE = {"lora": "networks.lora", "locon": "networks.lora", "dora": "networks.lora"}
PARAMS = PARAM_NAMES  # the adapter parameter names kohya/LyCORIS files use, as the core names them
CLIP_TOP = ("encoder", "embeddings", "final_layer_norm")
READ_PREFIXES = ("lora_unet", "lora_transformer", "lora_te1", "lora_te2", "lora_te3", "lora_te", "lycoris")


def clip_path(path: str) -> str:
    """transformers >= 5 CLIP text models dropped the `text_model.` level that kohya names keep."""
    return f"text_model.{path}" if path.split(".")[0] in CLIP_TOP else path


def _described(family: str) -> FamilyDescription | None:
    from personalize.models.families import describe  # late: personalize.models imports formats

    return describe(family)


def single_file_renames(family: str) -> Renames:
    """The layers a DiT family writes under their original names (none for UNet families)."""
    described = _described(family)
    return described.single_file_renames if described is not None else ()


def write_prefix(component: str, family: str, text_encoders: int) -> str:
    if component == "unet":
        return "lora_unet"
    if component == "transformer":
        described = _described(family)  # the single-file prefix ComfyUI maps for this DiT family
        return described.single_file_prefix if described is not None else "lora_transformer"
    if component.startswith("text_encoder"):
        index = 1 if component == "text_encoder" else int(component.rsplit("_", 1)[1])
        return "lora_te" if text_encoders == 1 and family != "sdxl" else f"lora_te{index}"
    return "lora_unet"  # a bare denoiser-like model handed over on its own


def kohya_module_name(
    component: str, path: str, family: str, text_encoders: int = 1, unet_config: Mapping[str, Any] | None = None
) -> str:
    """The kohya module name A1111/ComfyUI expect for `path` of `component`."""
    if component == "unet" and family == "sdxl":
        path = to_sgm(path, block_map(unet_config)) or path
    if component.startswith("text_encoder"):
        path = clip_path(path)
    if component == "transformer":
        renamed = kohya_name(single_file_renames(family), path)
        if renamed is not None:
            return renamed
    return f"{write_prefix(component, family, text_encoders)}_{path.replace('.', '_')}"


def to_kohya(
    components: Components, family: str, unet_config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Canonical component dict -> kohya/LyCORIS tensors (alpha as a 0-d float tensor per module)."""
    text_encoders = sum(1 for c in components if c.startswith("text_encoder")) or 1
    text_encoders = max(text_encoders, 2 if family == "sdxl" else 1)
    out: dict[str, torch.Tensor] = {}
    for component, sd in components.items():
        for path, group in group_by_module(sd).items():
            name = kohya_module_name(component, path, family, text_encoders, unet_config)
            for param, value in group.items():
                if param == "alpha":
                    value = value.reshape(()).float()
                out[f"{name}.{param}"] = value.contiguous()
            alpha = alpha_of(group)
            if alpha is not None and "alpha" not in group:
                out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def kohya_metadata(
    components: Components,
    *,
    method: str,
    family: str,
    hyper: Mapping[str, Any],
    resolution: int | None = None,
    output_name: str = "",
    base_model: str = "",
) -> dict[str, str]:
    """The `ss_*` strings kohya's scripts write and A1111/ComfyUI/civitai read."""
    groups = [group for sd in components.values() for group in group_by_module(sd).values()]
    ranks = [rank_of(g) for g in groups if rank_of(g) is not None]
    alphas = [alpha_of(g) for g in groups if alpha_of(g) is not None]
    args: dict[str, Any] = {}
    if method not in NETWORK_MODULE:
        args["algo"] = {"krona": "lokr", "oft": "diag-oft"}.get(method, method)
    args.update({k: v for k, v in hyper.items() if isinstance(v, (int, float, str, bool))})
    conv_ranks = [rank_of(g) for g in groups if any(v.dim() == 4 for v in g.values()) and rank_of(g)]
    if conv_ranks:
        args.setdefault("conv_dim", Counter(conv_ranks).most_common(1)[0][0])
    metadata = {
        "ss_network_module": NETWORK_MODULE.get(method, "lycoris.kohya"),
        "ss_network_dim": str(Counter(ranks).most_common(1)[0][0] if ranks else 1),
        "ss_network_alpha": _number(Counter(alphas).most_common(1)[0][0] if alphas else 1.0),
        "ss_network_args": json.dumps({k: str(v) for k, v in args.items()}),
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, family),
        "ss_v2": str(family == "sd2"),
        "ss_output_name": output_name,
        "ss_sd_model_name": base_model,
    }
    if resolution:
        metadata["ss_resolution"] = f"({resolution}, {resolution})"
    if method == "dora":
        metadata["ss_network_args"] = json.dumps({**json.loads(metadata["ss_network_args"]), "dora_wd": "True"})
    return metadata


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def split_kohya_key(key: str) -> tuple[str, str]:
    """ "lora_unet_x_y.lora_up.weight" -> ("lora_unet_x_y", "lora_up.weight")."""
    name, dot, rest = key.partition(".")
    if not dot or rest not in PARAMS:
        raise UserError(f"'{key}' is not a kohya/LyCORIS adapter key (expected <module>.lora_up.weight, .alpha, ...)")
    return name, rest


def is_kohya_key(key: str) -> bool:
    name, _, rest = key.partition(".")
    return rest in PARAMS and any(name.startswith(p + "_") for p in READ_PREFIXES)


def name_table(
    component_paths: Mapping[str, Sequence[str]],
    unet_config: Mapping[str, Any] | None = None,
    renames: Renames = (),
) -> dict[str, tuple[str, str]]:
    """Every kohya module name we accept -> (component, module path), for a model with these layers;
    `renames`: the denoiser family's `single_file_renames` (its layers' original names)."""
    encoders = sorted(c for c in component_paths if c.startswith("text_encoder"))
    table: dict[str, tuple[str, str]] = {}
    for component, paths in component_paths.items():
        if component.startswith("text_encoder"):
            index = 1 if component == "text_encoder" else int(component.rsplit("_", 1)[1])
            prefixes = [f"lora_te{index}"] + (["lora_te"] if index == 1 else [])
            if len(encoders) == 1:
                prefixes.append("lycoris")
        else:
            prefixes = ["lora_unet", "lora_transformer", "lycoris"]
        blocks = block_map(unet_config) if component == "unet" and unet_config and _is_unet(unet_config) else None
        for path in paths:
            names = {path}
            if component.startswith("text_encoder"):
                names.add(clip_path(path))
            if blocks:
                names.add(to_sgm(path, blocks) or path)
            for prefix in prefixes:
                for name in names:
                    table.setdefault(f"{prefix}_{name.replace('.', '_')}", (component, path))
            renamed = None if component.startswith("text_encoder") else kohya_name(renames, path)
            if renamed is not None:
                table.setdefault(renamed, (component, path))
    return table


def _is_unet(config: Mapping[str, Any]) -> bool:
    return "layers_per_block" in config and "down_block_types" in config and "up_block_types" in config


def from_kohya(tensors: Mapping[str, torch.Tensor], table: Mapping[str, tuple[str, str]]) -> Components:
    """kohya/LyCORIS tensors -> canonical component dict; names matching no layer are an error naming them."""
    out: Components = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        name, param = split_kohya_key(key)
        if name not in table:
            unknown.append(name)
            continue
        component, path = table[name]
        if param == "alpha":
            value = value.reshape(()).float()
        out.setdefault(component, {})[f"{path}.{param}"] = value
    if unknown:
        names = sorted(set(unknown))
        raise UserError(
            f"{len(names)} kohya module names match no layer of this model (e.g. {', '.join(names[:3])}); "
            "is the file for another base model family?"
        )
    for component, sd in out.items():
        _normalize(component, sd)
    return out


def _normalize(component: str, sd: dict[str, torch.Tensor]) -> None:
    """LyCORIS quirks -> canonical: IA3 conv vectors (1, C, 1, 1) -> (C,), on_input int -> bool."""
    for path, group in group_by_module(sd).items():
        if "weight" in group:
            sd[f"{path}.weight"] = group["weight"].reshape(-1)
            sd[f"{path}.on_input"] = torch.tensor(bool(group.get("on_input", torch.tensor(0))))
            continue
        if method_of(group) == "dora" and group["dora_scale"].shape[0] != group["lora_up.weight"].shape[0]:
            raise UserError(
                f"{component}.{path}: DoRA magnitude {tuple(group['dora_scale'].shape)} is per input channel "
                "(LyCORIS wd_on_out=False); only per-output-channel DoRA (wd_on_out=True) is supported"
            )
