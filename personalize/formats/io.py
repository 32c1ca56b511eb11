"""`save_adapter` and `read_adapter`: our adapters in every shared layout, and every layout back onto a model.

save_adapter writes (atomically: nothing is left behind when a step fails)
    LoRA/LoCon/DoRA on diffusion  pytorch_lora_weights.safetensors (diffusers) + <output_name>.safetensors (kohya)
    LoHa/LoKr/KronA/IA3           <output_name>.safetensors (kohya/LyCORIS, ss_* metadata)
    family llm / vlm              adapter_config.json + adapter_model.safetensors (peft)
    embeddings                    learned_embeds.safetensors (+ learned_embeds_2 for SDXL) + a1111/<token>.safetensors
read_adapter detects the layout of a file or folder and maps its names onto the given pipeline or model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from personalize import adapters
from personalize.adapters import group_by_module
from personalize.adapters.targets import wrappable_paths
from personalize.errors import UserError
from personalize.formats import detect, diffusers, embeddings, kohya, peft
from personalize.formats.canonical import LORA_METHODS, LYCORIS_METHODS, Components, method_of
from personalize.formats.embeddings import Embeddings
from personalize.formats.kohya_guess import guess_path
from personalize.formats.original_names import diffusers_path
from personalize.models.presets import model_kind

EMBEDDING_NAMES = re.compile(r"(.*\.)?(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|token_embedding)")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENT_OF_KIND = {"unet": "unet", "dit": "transformer", "clip": "text_encoder", "t5": "text_encoder"}


@dataclass
class AdapterFile:
    components: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layout: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The method saved in our metadata, else the one the weights show (lora/dora/loha/lokr/ia3)."""
        if self.metadata.get("personalize_method"):
            return self.metadata["personalize_method"]
        found = {method_of(g) for sd in self.components.values() for g in group_by_module(sd).values()}
        return "+".join(sorted(found)) or "embedding"

    def apply(self, pipe_or_model: Any, name: str = "default", scale: float = 1.0) -> list[str]:
        """Attach the adapters to `pipe_or_model` (same object `read_adapter` mapped them to)."""
        targets = model_components(pipe_or_model)
        done = []
        for component, sd in self.components.items():
            paths = adapters.inject_from_state_dict(targets[component], sd, name=name, scale=scale)
            done += [f"{component}.{p}" for p in paths]
        return done


def model_components(pipe_or_model: Any) -> dict[str, nn.Module]:
    """{"unet"/"transformer"/"text_encoder*": module} of a pipeline, or {component: model} for one model."""
    if isinstance(pipe_or_model, nn.Module):
        kind = model_kind(pipe_or_model)
        return {COMPONENT_OF_KIND.get(kind, "model"): pipe_or_model}
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, Mapping):
        raise UserError(f"expected a diffusers pipeline or a torch model, got {type(pipe_or_model).__name__}")
    return {n: components[n] for n in COMPONENTS if isinstance(components.get(n), nn.Module)}


# ----------------------------------------------------------------------------------------------- saving


def _metadata(method: str, family: str, hyper: Mapping[str, Any], base_model: str) -> dict[str, str]:
    return {
        "personalize_method": method,
        "personalize_family": family,
        "personalize_hyper": json.dumps(dict(hyper), sort_keys=True, default=str),
        "personalize_base_model": base_model,
    }


def _write_all(folder: Path, files: Mapping[str, tuple[dict[str, torch.Tensor], dict[str, str]]], texts: dict) -> list:
    """Write every file to a temporary name first, then rename them all: no half-written output on failure."""
    staged: list[tuple[Path, Path]] = []
    try:
        for relative, (tensors, metadata) in files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            os.close(handle)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
            staged.append((Path(temporary), target))
        for relative, text in texts.items():
            target = folder / relative
            handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                stream.write(text)
            staged.append((Path(temporary), target))
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    for temporary, target in staged:
        os.replace(temporary, target)
    return [target for _, target in staged]


def save_adapter(
    folder: str | Path,
    components: Components,
    *,
    method: str,
    family: str,
    hyper: Mapping[str, Any],
    base_model: str = "",
    embeddings: Embeddings | None = None,
    resolution: int | None = None,
    output_name: str = "",
    unet_config: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
) -> list[Path]:
    """Write the adapter (and embeddings) in the layouts its method and family are read in; returns the files.

    `unet_config` (SDXL) picks the SGM block map for kohya names (default: the released SDXL UNet);
    `model` (LLM/VLM) tells which layers are nn.Embedding for peft (else their names do)."""
    folder = Path(folder)
    method = method.lower()
    output_name = output_name or folder.name or "adapter"
    components = {c: dict(sd) for c, sd in components.items() if sd}
    metadata = _metadata(method, family, hyper, base_model)
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
    texts: dict[str, str] = {}
    if components and family in ("llm", "vlm"):
        if set(components) != {"model"}:
            raise UserError(f"an {family} adapter has one component 'model', got {sorted(components)}")
        tensors, config = _peft(components["model"], family, base_model, model)
        files[peft.WEIGHTS_FILE] = (tensors, {"format": "pt", **metadata})
        texts[peft.CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True)
    elif components:
        if method not in LORA_METHODS + LYCORIS_METHODS:
            raise UserError(
                f"'{method}' adapters have no shared file format (diffusers, kohya and peft hold "
                f"{', '.join(LORA_METHODS + LYCORIS_METHODS)})"
            )
        _refuse_input_side(components)
        if method in LORA_METHODS:
            tensors, diffusers_metadata = diffusers.to_diffusers(components)
            files[diffusers.DIFFUSERS_FILE] = (tensors, {**diffusers_metadata, **metadata})
        ss = kohya.kohya_metadata(
            components,
            method=method,
            family=family,
            hyper=hyper,
            resolution=resolution,
            output_name=output_name,
            base_model=base_model,
        )
        files[f"{output_name}.safetensors"] = (kohya.to_kohya(components, family, unet_config), {**ss, **metadata})
    for relative, tensors in embeddings_files(embeddings or {}).items():
        files[relative] = (tensors, metadata)
    if not files:
        raise UserError("nothing to save: the adapter has no weights and there are no embeddings")
    folder.mkdir(parents=True, exist_ok=True)
    return _write_all(folder, files, texts)


def _refuse_input_side(components: Components) -> None:
    """kohya/LyCORIS OFT rotates output channels; an input-side (peft-style) rotation would be misread."""
    for component, sd in components.items():
        for path, group in group_by_module(sd).items():
            if "oft_blocks" in group and "on_input" in group:
                raise UserError(
                    f"{component}.{path}: OFT/BOFT on input channels (peft's form) has no kohya/LyCORIS layout; "
                    "train it with on_input=False for A1111/ComfyUI"
                )


def embeddings_files(found: Embeddings) -> dict[str, dict[str, torch.Tensor]]:
    return embeddings.to_embedding_files(found) if found else {}


def _peft(sd: Mapping[str, torch.Tensor], family: str, base_model: str, model: nn.Module | None) -> tuple:
    if model is not None:
        embedding_paths = {p for p, m in model.named_modules() if isinstance(getattr(m, "base_layer", m), nn.Embedding)}
    else:
        embedding_paths = {p for p in group_by_module(sd) if EMBEDDING_NAMES.fullmatch(p)}
    task_type = "CAUSAL_LM" if family == "llm" else None
    return peft.to_peft(sd, base_model=base_model, task_type=task_type, embedding_paths=frozenset(embedding_paths))


# ---------------------------------------------------------------------------------------------- reading


def read_adapter(path: str | Path, pipe_or_model: Any, allow_pickle: bool = False) -> AdapterFile:
    """A file or folder in any supported layout, mapped onto `pipe_or_model`'s module paths and checked.

    With `pipe_or_model=None` names are only parsed (kohya names through a vocabulary; nothing is checked):
    what `personalize inspect` and a model-less `personalize convert` use."""
    path = Path(path)
    targets = model_components(pipe_or_model) if pipe_or_model is not None else None
    result = AdapterFile()
    subfolders = [c for c in COMPONENTS if (path / c / peft.CONFIG_FILE).is_file()] if path.is_dir() else []
    if subfolders and not (path / peft.CONFIG_FILE).is_file():  # `convert --to peft` of a whole pipeline
        for component in subfolders:
            part = AdapterFile()
            tensors, metadata = detect.read_tensors(path / component / peft.WEIGHTS_FILE, allow_pickle)
            metadata = {**metadata, "peft_config": json.dumps(detect.read_peft_config(path / component))}
            _map_tensors("peft", tensors, metadata, _only(targets, component), part, component)
            result.components.update({component: next(iter(part.components.values()))})
            result.metadata = part.metadata
        result.layout = "peft"
    elif path.is_dir():
        adapter, embedding_paths = detect.folder_files(path)
        if adapter is not None:
            _read_adapter_file(adapter[0], adapter[1], targets, result, allow_pickle)
        for file in embedding_paths:
            tensors, metadata = detect.read_tensors(file, allow_pickle)
            component = "text_encoder_2" if file.name == embeddings.EMBEDS_FILE_2 else "text_encoder"
            embeddings.merge_embeddings(
                result.embeddings, embeddings.from_embedding_dict(tensors, file.stem, component)
            )
            result.metadata = {**metadata, **result.metadata}
        result.layout = result.layout or "embedding"
    else:
        data, metadata = detect.read_tensors(path, allow_pickle)
        layout = detect.layout_of(data, path.name)
        if layout == "embedding":
            result.embeddings = embeddings.from_embedding_dict(data, path.stem)
            result.layout, result.metadata = "embedding", metadata
        else:
            _map_tensors(layout, data, metadata, targets, result, path.name)
    if result.embeddings and targets is not None:
        embeddings.check_dims(result.embeddings, _embedding_dims(targets))
    return result


def _only(targets: dict | None, component: str) -> dict | None:
    if targets is None:
        return None
    if component not in targets:
        raise UserError(f"the adapter has weights for {component}, which this model does not have ({sorted(targets)})")
    return {component: targets[component]}


def _read_adapter_file(layout: str, path: Path, targets: dict | None, result: AdapterFile, allow_pickle: bool) -> None:
    if layout == "peft":
        tensors, metadata = detect.read_tensors(path / peft.WEIGHTS_FILE, allow_pickle)
        metadata = {**metadata, "peft_config": json.dumps(detect.read_peft_config(path))}
    else:
        tensors, metadata = detect.read_tensors(path, allow_pickle)
    _map_tensors(layout, tensors, metadata, targets, result, path.name)


def _map_tensors(
    layout: str, data: dict, metadata: dict, targets: dict | None, result: AdapterFile, where: str
) -> None:
    if targets is None:
        result.components, result.layout, result.metadata = _parse_only(layout, data, metadata, where), layout, metadata
        return
    if layout == "peft":
        if "peft_config" not in metadata:
            raise UserError(f"{where} is a peft weights file; read its folder (with {peft.CONFIG_FILE}) instead")
        sd = peft.from_peft(data, json.loads(metadata["peft_config"]))
        component = next((c for c in ("model", "unet", "transformer") if c in targets), next(iter(targets)))
        components = {component: sd}
    elif layout == "diffusers":
        data = _component_prefixed(data, targets)
        components = diffusers.from_diffusers(data, metadata, tuple(targets))
    elif layout == "canonical":
        components = split_components(data)
    elif layout == "kohya":
        unet = targets.get("unet")
        config = dict(unet.config) if unet is not None and hasattr(unet, "config") else None
        paths = {c: wrappable_paths(m) for c, m in targets.items()}
        table = kohya.name_table(paths, config, _renames_of(targets))
        components = kohya.from_kohya(data, table)
    else:
        raise UserError(f"{where}: layout {layout} holds no adapter weights")
    components = {c: align_text_paths(sd, targets[c]) if c in targets else sd for c, sd in components.items()}
    for component, sd in components.items():
        check_fits(component, sd, targets)
    result.components, result.layout, result.metadata = components, layout, dict(metadata)


def split_components(data: Mapping[str, torch.Tensor]) -> Components:
    """{"unet.a.b.lora_up.weight": t} -> {"unet": {"a.b.lora_up.weight": t}} (our raw canonical files)."""
    out: Components = {}
    for key, value in data.items():
        component, _, rest = key.partition(".")
        out.setdefault(component, {})[rest] = value
    return out


def _component_prefixed(data: dict, targets: dict) -> dict:
    """diffusers keys with the pipeline component first. A file for one component loads onto a bare model
    whatever its prefix; keys with no component prefix (old `save_attn_procs` files) belong to the denoiser."""
    heads = {k.partition(".")[0] for k in data}
    known = set(COMPONENTS) | {"model"}
    if not heads & known:
        denoiser = next((c for c in ("unet", "transformer", "model") if c in targets), next(iter(targets)))
        return {f"{denoiser}.{k}": v for k, v in data.items()}
    if len(targets) == 1 and len(heads) == 1:
        (only,) = targets
        return {f"{only}.{k.partition('.')[2]}": v for k, v in data.items()}
    return data


def _parse_only(layout: str, data: dict, metadata: dict, where: str) -> Components:
    if layout == "peft":
        if "peft_config" not in metadata:
            raise UserError(f"{where} is a peft weights file; read its folder (with {peft.CONFIG_FILE}) instead")
        return {"model": peft.from_peft(data, json.loads(metadata["peft_config"]))}
    if layout == "diffusers":
        return diffusers.from_diffusers(data, metadata)
    if layout == "canonical":
        return split_components(data)
    if layout == "kohya":
        names = {kohya.split_kohya_key(k)[0] for k in data}
        renames = kohya.single_file_renames(metadata.get("personalize_family", ""))
        return kohya.from_kohya(data, {name: _guess(name, renames) for name in names})
    raise UserError(f"{where}: layout {layout} holds no adapter weights")


def _renames_of(targets: Mapping[str, nn.Module]) -> tuple[tuple[str, str], ...]:
    """The `single_file_renames` of the DiT family the denoiser belongs to (by its class; a bare one too)."""
    from personalize.models.families import family_of_module

    for component in ("transformer", "model"):
        described = family_of_module(targets[component]) if component in targets else None
        if described is not None:
            return described.single_file_renames
    return ()


def _guess(name: str, renames: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(component, path) of a kohya name without a model: exact for a renamed layer of our own file."""
    path = diffusers_path(renames, name)
    return ("transformer", path) if path is not None else guess_path(name)


def align_text_paths(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Files written with transformers < 5 name CLIP layers "text_model.encoder..."; newer models have no
    `text_model` level (and the reverse). Map whichever the file uses onto the model's paths."""
    has_level = any(name == "text_model" for name, _ in model.named_children())
    if has_level or not any(k.startswith("text_model.") for k in sd):
        if not has_level or all(k.startswith("text_model.") for k in sd):
            return sd
        return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _embedding_dims(targets: Mapping[str, nn.Module]) -> dict[str, int]:
    dims = {}
    for component, module in targets.items():
        if component.startswith("text_encoder") and hasattr(module, "get_input_embeddings"):
            dims[component] = int(module.get_input_embeddings().weight.shape[1])
    return dims


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Linear):
        return (base.out_features, base.in_features)
    return tuple(base.weight.shape)


def implied_shape(group: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(out, in * kh * kw) the adapter's delta has; None for IA3 (a vector on one side)."""
    method = method_of(group)
    if method in ("lora", "dora"):
        return int(group["lora_up.weight"].shape[0]), int(group["lora_down.weight"][0].numel())
    if method == "loha":
        if "hada_t1" in group:
            t1 = group["hada_t1"]
            kernel = int(t1.shape[2:].numel())
            return int(group["hada_w1_a"].shape[1]), int(group["hada_w1_b"].shape[1]) * kernel
        return int(group["hada_w1_a"].shape[0]), int(group["hada_w1_b"].shape[1])
    if method == "lokr":
        w1 = group.get("lokr_w1")
        l, m = w1.shape if w1 is not None else (group["lokr_w1_a"].shape[0], group["lokr_w1_b"].shape[1])  # noqa: E741
        if "lokr_w2" in group:
            k, n_flat = group["lokr_w2"].shape[0], group["lokr_w2"][0].numel()
        elif "lokr_t2" in group:  # Tucker: w2_a (r, k), w2_b (r, n), t2 (r, r, kh, kw)
            kernel = int(group["lokr_t2"].shape[2:].numel())
            k, n_flat = group["lokr_w2_a"].shape[1], group["lokr_w2_b"].shape[1] * kernel
        else:
            k, n_flat = group["lokr_w2_a"].shape[0], group["lokr_w2_b"].shape[1]
        return int(l * k), int(m * n_flat)
    return None


def check_fits(component: str, sd: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Module]) -> None:
    """Every module exists in the model (else list them) and its adapter's shape fits the layer's weight."""
    if component not in targets:
        raise UserError(f"the adapter has weights for {component}, which this model does not have ({sorted(targets)})")
    model = targets[component]
    groups = group_by_module(sd)
    known = set(wrappable_paths(model))
    unknown = sorted(p for p in groups if p not in known)
    if unknown:
        raise UserError(
            f"{len(unknown)} adapter modules match no layer of {component} (e.g. {', '.join(unknown[:3])}); "
            "is the adapter for another model family?"
        )
    for path, group in groups.items():
        shape = _weight_shape(model.get_submodule(path))
        flat = (shape[0], int(torch.Size(shape[1:]).numel()))
        if isinstance(getattr(model.get_submodule(path), "base_layer", model.get_submodule(path)), nn.Embedding):
            flat = (shape[1], shape[0])  # LoRA on an Embedding: up (dim, r), down (r, num)
        implied = implied_shape(group)
        if implied is not None and implied != flat:
            keys = [k for k in group if k not in ("alpha", "on_input", "dora_scale")]
            key = keys[0]
            if "lora_down.weight" in group:
                key = "lora_up.weight" if implied[0] != flat[0] else "lora_down.weight"
            raise UserError(
                f"{component}.{path}.{key} has shape {tuple(group[key].shape)} (a {implied[0]}x{implied[1]} update), "
                f"but the layer's weight is {tuple(shape)}"
            )
        if "oft_blocks" in group:
            _check_orthogonal(component, path, group, shape)
        elif "difffit_gamma" in group:
            if group["difffit_gamma"].numel() != shape[0]:
                raise UserError(f"{component}.{path}.difffit_gamma does not fit the layer's weight {tuple(shape)}")
        elif "vera_lambda_b" in group:
            if group["vera_lambda_b"].shape[0] != shape[0] or group["vera_A"].shape[1] < shape[1]:
                raise UserError(
                    f"{component}.{path}: VeRA vectors for a {group['vera_lambda_b'].shape[0]}-output layer with "
                    f"projections {tuple(group['vera_A'].shape)}, but the layer's weight is {tuple(shape)}"
                )
        elif implied is None and group["weight"].numel() not in (shape[0], shape[1]):
            raise UserError(
                f"{component}.{path}.weight has shape {tuple(group['weight'].shape)}, "
                f"but the layer's weight is {tuple(shape)}"
            )


def _check_orthogonal(component: str, path: str, group: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """OFT/BOFT blocks cover the output channels (LyCORIS), or the input channels with `on_input` (peft)."""
    blocks = group["oft_blocks"]
    on_input = bool(group.get("on_input", torch.tensor(False)))
    channels = shape[1] if on_input else shape[0]
    if blocks.shape[-3] * blocks.shape[-1] != channels:
        side = "input" if on_input else "output"
        raise UserError(
            f"{component}.{path}.oft_blocks has shape {tuple(blocks.shape)}, but the layer has {channels} {side} "
            f"channels (weight {tuple(shape)})"
        )
