"""Load, scale, fuse and unload named adapters on a stock diffusers pipeline.

    load_adapter(pipe, "out/cat", scale=1.0, name="cat")   # LoRA/LoCon/DoRA/LoHa/LoKr/KronA/IA3 + TI
    set_adapter_scale(pipe, "cat", 0.5); fuse(pipe); unfuse(pipe); unload_adapter(pipe, "cat")

Weights go through the injection core (`personalize.adapters`) into the UNet/transformer and text
encoders; each adapter keeps its own scale, so several stack: y = W x + sum_a scale_a * dW_a x.
Unloading unwraps the layers back to the original module objects, so the pipeline's outputs are
bit-identical to the base afterwards (also after fuse + unfuse, see fusion.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from personalize import adapters
from personalize.config import nearest
from personalize.errors import UserError
from personalize.formats.detect import selective_method
from personalize.pipelines import embeddings as ti
from personalize.pipelines import fusion, layerwise
from personalize.pipelines.components import require_components
from personalize.pipelines.source import AdapterSource, _read

REGISTRY_ATTRIBUTE = "_personalize_adapters"
ORIGINALS_ATTRIBUTE = "_personalize_fused_originals"


@dataclass
class LoadedAdapter:
    name: str
    source: str
    scale: float
    components: list[str]  # pipeline components that carry its weights
    embeddings: ti.PerEncoder = field(default_factory=dict)
    fused: bool = False
    controlnext: bool = False  # a ControlNeXt module runs in the UNet (pipelines/controlnext.py)

    @property
    def tokens(self) -> list[str]:
        return sorted({token for tokens in self.embeddings.values() for token in tokens})


def loaded_adapters(pipe: Any) -> dict[str, LoadedAdapter]:
    """The adapters `load_adapter` put on this pipeline, in load order (a live dict: do not edit)."""
    return pipe.__dict__.setdefault(REGISTRY_ATTRIBUTE, {})


def _get(pipe: Any, name: str) -> LoadedAdapter:
    registry = loaded_adapters(pipe)
    if name not in registry:
        known = list(registry)
        raise UserError(f"no adapter named '{name}' is loaded{nearest(name, known)}; loaded: {known or 'none'}")
    return registry[name]


def _default_name(source: Any, registry: dict[str, LoadedAdapter]) -> str:
    stem = Path(source).stem if isinstance(source, (str, Path)) else "adapter"
    stem = stem if stem not in ("pytorch_lora_weights", "learned_embeds", "") else Path(source).parent.name
    name, index = stem or "adapter", 2
    while name in registry:
        name, index = f"{stem}_{index}", index + 1
    return name


def _misfit(module: nn.Module, tensors: dict[str, Any], component: str) -> str:
    """Which module of `tensors` does not fit `module`, and why (only called after a failed load)."""
    for path, group in adapters.group_by_module(tensors).items():
        holder = nn.ModuleDict({"layer": module.get_submodule(path)})  # wraps a reference, not the model
        try:
            adapters.inject_from_state_dict(holder, {f"layer.{key}": value for key, value in group.items()})
        except (RuntimeError, ValueError, UserError) as error:
            reason = " ".join(str(error).split())
            detail = reason.split("size mismatch for ", 1)[-1] if "size mismatch" in reason else reason
            return f"{component}.{path}: {detail[:300]}"
    return f"{component}: the weights do not fit"


def _inject_selective(module: nn.Module, tensors: dict[str, Any], name: str, scale: float, component: str) -> None:
    """bitfit / norm values: the named parameters become a selective adapter (scalable, unloadable)."""
    if any(key.endswith(".difffit_gamma") for key in tensors):
        return _inject_difffit(module, tensors, name, scale)
    present = dict(module.named_parameters())
    wrong = [key for key, value in tensors.items() if key not in present or present[key].shape != value.shape]
    if wrong:
        raise UserError(
            f"the adapter does not fit this pipeline's {component} ({component}.{wrong[0]} is not a parameter of "
            "that shape); is it for another model family?"
        )
    adapters.inject(module, "unfreeze", targets=list(tensors), name=name, freeze=False)
    adapters.load_state_dict(module, tensors, name)
    adapters.set_scale(module, name, scale)
    for key in tensors:  # loaded for inference: nothing to train
        present[key].requires_grad_(False)


def _inject_difffit(module: nn.Module, tensors: dict[str, Any], name: str, scale: float) -> None:
    """DiffFit: its gamma layers where the file has them, then its biases and norms (strict keys and shapes)."""
    layers = sorted(key.rsplit(".", 1)[0] for key in tensors if key.endswith(".difffit_gamma"))
    adapters.inject(module, "difffit", targets=layers, name=name, freeze=False)
    try:
        adapters.load_state_dict(module, tensors, name)
    except UserError:
        adapters.remove(module, name)
        raise
    adapters.set_scale(module, name, scale)
    for parameter in adapters.trainable_parameters(module, name):  # loaded for inference: nothing to train
        parameter.requires_grad_(False)


def _inject(
    module: nn.Module, tensors: dict[str, Any], name: str, scale: float, component: str, selective: bool = False
) -> None:
    if selective:
        return _inject_selective(module, tensors, name, scale, component)
    try:
        adapters.inject_from_state_dict(module, tensors, name=name, scale=scale)
    except UserError as error:
        raise UserError(f"{component}: {error}") from None
    except (RuntimeError, ValueError):
        _remove_quietly(module, name)
        raise UserError(
            f"the adapter does not fit this pipeline's {component} ({_misfit(module, tensors, component)}); "
            "is it for another model family?"
        ) from None


def _remove_quietly(module: nn.Module, name: str) -> None:
    with contextlib.suppress(UserError):  # nothing of it was attached
        adapters.remove(module, name)


def load_adapter(
    pipe: Any, path_or_components: Any, scale: float = 1.0, name: str | None = None, allow_pickle: bool = False
) -> str:
    """Load an adapter (weights and/or Textual Inversion embeddings) under `name`; returns the name.

    Nothing is changed when any part does not fit: the error names the keys that do not."""
    registry = loaded_adapters(pipe)
    from personalize.pipelines import controlnext

    if (file := controlnext.controlnext_file(path_or_components)) is not None:  # module hooks + UNet values
        name = name or _default_name(path_or_components, registry)
        if name in registry:
            raise UserError(f"an adapter named '{name}' is already loaded; unload it first or pass another name")
        components = controlnext.load(pipe, file, float(scale), name)
        registry[name] = LoadedAdapter(name, str(path_or_components), float(scale), components, controlnext=True)
        return name
    source: AdapterSource = _read(path_or_components, pipe, allow_pickle=allow_pickle)
    if isinstance(path_or_components, (str, Path)):
        source.label = str(path_or_components)
    name = name or _default_name(path_or_components, registry)
    if name in registry:
        raise UserError(f"an adapter named '{name}' is already loaded; unload it first or pass another name")
    weights = {component: tensors for component, tensors in source.components.items() if tensors}
    if not weights and not source.embeddings:
        raise UserError(f"{source.label} holds no adapter weights and no embeddings")
    modules = require_components(pipe, list(weights))
    selective = selective_method(source.metadata) is not None
    loaded_embeddings = [adapter.embeddings for adapter in registry.values()]
    per_encoder = ti.check(pipe, source.embeddings, ti.taken_tokens(loaded_embeddings))
    layerwise.check(pipe, _tokens([*loaded_embeddings, per_encoder]))  # ED-LoRA tokens fit the UNet
    done: list[str] = []
    try:
        for component, tensors in weights.items():
            _inject(modules[component], tensors, name, float(scale), component, selective)
            done.append(component)
        if per_encoder:
            ti.rebuild(pipe, [*loaded_embeddings, per_encoder])
            layerwise.rebuild(pipe, _tokens([*loaded_embeddings, per_encoder]))
    except BaseException:
        for component in done:
            _remove_quietly(modules[component], name)
        raise
    registry[name] = LoadedAdapter(name, source.label, float(scale), list(weights), per_encoder)
    return name


def _tokens(loaded: list[ti.PerEncoder]) -> set[str]:
    return {token for per_encoder in loaded for tokens in per_encoder.values() for token in tokens}


def _modules(pipe: Any, adapter: LoadedAdapter) -> list[nn.Module]:
    return list(require_components(pipe, adapter.components).values())


def set_adapter_scale(pipe: Any, name: str, scale: float) -> None:
    """Scale adapter `name`'s weights (0 turns it off; embeddings are not scaled)."""
    adapter = _get(pipe, name)
    if adapter.fused:
        raise UserError(f"adapter '{name}' is fused into the weights; unfuse(pipe) before changing its scale")
    for module in _modules(pipe, adapter):
        adapters.set_scale(module, name, float(scale))
    adapter.scale = float(scale)


def _originals(pipe: Any) -> fusion.Originals:
    return pipe.__dict__.setdefault(ORIGINALS_ATTRIBUTE, {})


def fuse(pipe: Any, name: str | None = None, keep_original: bool = True) -> list[str]:
    """Fold adapter `name` (all loaded when None) into the base weights at its scale: faster inference,
    same outputs up to rounding. Returns the names fused.

    `keep_original` keeps a CPU copy of each touched base weight so that `unfuse` restores it exactly
    (off: no extra memory, and unfuse subtracts the delta, which rounds)."""
    chosen = [_get(pipe, name)] if name else list(loaded_adapters(pipe).values())
    originals = _originals(pipe) if keep_original else None
    for adapter in chosen:
        if not adapter.fused:
            for component, module in require_components(pipe, adapter.components).items():
                fusion.fuse_component(module, component, adapter.name, originals)
            adapter.fused = True
    return [adapter.name for adapter in chosen]


def unfuse(pipe: Any, name: str | None = None) -> list[str]:
    """Undo `fuse`: once nothing is fused into a layer its base weight is exactly the original again
    (when `fuse` kept it). Returns the names unfused."""
    chosen = [_get(pipe, name)] if name else list(loaded_adapters(pipe).values())
    for adapter in reversed(chosen):
        if adapter.fused:
            for component, module in require_components(pipe, adapter.components).items():
                fusion.unfuse_component(module, component, adapter.name, _originals(pipe))
            adapter.fused = False
    return [adapter.name for adapter in chosen]


def unload_adapter(pipe: Any, name: str | None = None) -> list[str]:
    """Remove adapter `name` (all when None): its layers and tokens go, the base modules come back.
    Returns the names unloaded."""
    registry = loaded_adapters(pipe)
    chosen = [_get(pipe, name)] if name else list(registry.values())
    unfuse(pipe, name)
    for adapter in reversed(chosen):
        for module in _modules(pipe, adapter):
            adapters.remove(module, adapter.name)
        if adapter.controlnext:
            from personalize.pipelines import controlnext

            controlnext.unload(pipe)
        del registry[adapter.name]
    if any(adapter.embeddings for adapter in chosen):
        ti.rebuild(pipe, [adapter.embeddings for adapter in registry.values()])
        layerwise.rebuild(pipe, _tokens([adapter.embeddings for adapter in registry.values()]))
    return [adapter.name for adapter in chosen]


def describe_adapters(pipe: Any) -> list[dict[str, Any]]:
    """[{name, source, scale, components, tokens, fused}] for logs and PNG metadata."""
    return [
        {
            "name": adapter.name,
            "source": adapter.source,
            "scale": adapter.scale,
            "components": adapter.components,
            "tokens": adapter.tokens,
            "fused": adapter.fused,
        }
        for adapter in loaded_adapters(pipe).values()
    ]
