"""The functions that attach, scale, fold, save and remove named adapters on ANY torch model.

Nothing subclasses the model: matching layers are swapped in place for an `AdapterLayer` that keeps
the original as `base_layer`; selective methods (bitfit, norm, unfreeze) only flip `requires_grad`
and remember the original values. Canonical state dict keys are "<module path>.<param name>" with
the kohya/LyCORIS parameter names (`lora_down.weight`, `hada_w1_a`, `lokr_w1`, `alpha`, ...).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from personalize.adapters import difffit, prompt, selective
from personalize.adapters.adalora import AdaLoRA
from personalize.adapters.base import AdapterModule
from personalize.adapters.bottleneck import PLACEMENTS, Bottleneck, Compacter, Pfeiffer
from personalize.adapters.delta_lora import DeltaLoRA
from personalize.adapters.fusion import Fusion
from personalize.adapters.ia3 import IA3
from personalize.adapters.increlora import IncreLoRA
from personalize.adapters.layer import AdapterLayer
from personalize.adapters.loha import LoHa
from personalize.adapters.lokr import LoKr, krona
from personalize.adapters.lora import LoRA
from personalize.adapters.mpo import MPO
from personalize.adapters.oft import BOFT, OFT
from personalize.adapters.quant import dequantized_weight, quant_mode, warn_requantize, write_weight
from personalize.adapters.sparse import ChildTuning, DiffPruning, SparseDelta
from personalize.adapters.targets import select
from personalize.adapters.vera import VeRA, shared_projections
from personalize.config import nearest
from personalize.errors import UserError
from personalize.models.presets import model_kind

IA3_INPUT_SIDE = r"(.*\.)?(ff\.net\.2|fc2|down_proj|wo|proj_out)"
DEFAULT_TARGETS = {"unet": "attention", "dit": "attention", "clip": "text", "t5": "text", "llm": "all-linear"}
DEFAULT_TARGETS["vlm"] = "language"
INPUT_SIDE_KINDS = ("llm", "vlm")  # OFT/BOFT rotate the input there, as peft does (the UNet: outputs, LyCORIS)


def _lora(base: nn.Module, **hyper: Any) -> AdapterModule:
    return LoRA(base, **hyper)


def _dora(base: nn.Module, **hyper: Any) -> AdapterModule:
    return LoRA(base, dora=True, **hyper)


BUILDERS: dict[str, Callable[..., AdapterModule]] = {
    "lora": _lora,
    "locon": _lora,
    "dora": _dora,
    "loha": LoHa,
    "lokr": LoKr,
    "krona": krona,
    "ia3": IA3,
    "oft": OFT,
    "boft": BOFT,
    "vera": VeRA,
    "adalora": AdaLoRA,
    "delta-lora": DeltaLoRA,
    "increlora": IncreLoRA,
    "mpo": MPO,
    "houlsby": Bottleneck,
    "pfeiffer": Pfeiffer,
    "compacter": Compacter,
    "fish-mask": SparseDelta,
    "child-tuning": ChildTuning,
    "diff-pruning": DiffPruning,
    "fusion": Fusion,
}
METHODS = tuple(BUILDERS) + selective.SELECTIVE_METHODS + prompt.PROMPT_METHODS + ("difffit",)


def _hyperparameters(builder: Callable[..., Any]) -> list[str]:
    target = LoRA if builder in (_lora, _dora) else builder
    internal = ("self", "base_layer", "plan", "krona_init", "projections")
    names = [p for p in inspect.signature(target).parameters if p not in internal]
    return [n for n in names if not (builder is _dora and n == "dora")]


def _check_hyper(method: str, hyper: Mapping[str, Any]) -> None:
    valid = _hyperparameters(BUILDERS[method])
    for key in hyper:
        if key not in valid:
            raise UserError(f"{method} has no option '{key}'{nearest(key, valid)}; options: {', '.join(valid)}")


def _layers(model: nn.Module, name: str | None = None) -> list[tuple[str, AdapterLayer]]:
    return [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, AdapterLayer) and (name is None or name in module.adapters)
    ]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _names(model: nn.Module) -> set[str]:
    layer_names = {n for _, layer in _layers(model) for n in layer.adapters}
    return layer_names | set(selective.registry(model)) | set(prompt.names(model))


def _require(model: nn.Module, name: str) -> None:
    if name not in _names(model):
        known = sorted(_names(model))
        raise UserError(f"no adapter named '{name}' on this model{nearest(name, known)}; adapters: {known or 'none'}")


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters (and selected ones) train; everything else is frozen."""
    adapter_params = {id(p) for _, layer in _layers(model) for p in layer.adapters.parameters()}
    adapter_params |= {id(p) for name in prompt.names(model) for p in prompt.registry(model)[name].parameters()}
    chosen = {name for adapter in selective.registry(model).values() for name in adapter.originals}
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            continue
        p.requires_grad_(name in chosen)


def inject(
    model: nn.Module,
    method: str,
    targets: str | Sequence[str] | None = None,
    name: str = "default",
    scale: float = 1.0,
    freeze: bool = True,
    **hyper: Any,
) -> list[str]:
    """Attach adapter `name` of `method` to the layers `targets` selects; returns their paths.

    `freeze` (default) leaves only adapter parameters trainable, as peft does."""
    method = method.lower()
    if method not in METHODS:
        raise UserError(f"unknown adapter method '{method}'{nearest(method, METHODS)}; methods: {', '.join(METHODS)}")
    if name in _names(model):
        raise UserError(f"an adapter named '{name}' is already on this model; pick another name or remove it first")
    if method in selective.SELECTIVE_METHODS:
        return _inject_selective(model, method, targets, name, freeze)
    if method == "difffit":
        if hyper:
            raise UserError(f"difffit has no options (got {', '.join(hyper)})")
        return _inject_difffit(model, targets, name, scale, freeze)
    if method in prompt.PROMPT_METHODS:  # a forward hook on the whole model, not wrapped layers
        prompt.attach(model, method, name, scale, **hyper)
        if freeze:
            freeze_base(model)
        return [f"{prompt.REGISTRY_ATTRIBUTE}.{name}"]
    _check_hyper(method, hyper)
    if targets is None and hasattr(BUILDERS[method], "default_targets"):  # AdapterFusion: where its tasks are
        targets = BUILDERS[method].default_targets(model, **hyper)
    targets = targets if targets is not None else PLACEMENTS.get(method) or DEFAULT_TARGETS[model_kind(model)]
    paths = select(model, targets)
    if method == "vera":  # one pair of frozen random matrices for every layer of this adapter
        layers = [getattr(model.get_submodule(p), "base_layer", model.get_submodule(p)) for p in paths]
        hyper = {**hyper, "projections": shared_projections(layers, hyper.get("rank", 256), hyper.get("seed", 0))}
    for path in paths:
        module = model.get_submodule(path)
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
        options = dict(hyper)
        if method == "ia3" and "on_input" not in options:
            options["on_input"] = re.fullmatch(IA3_INPUT_SIDE, path) is not None
        if method in ("oft", "boft") and "on_input" not in options:
            options["on_input"] = model_kind(model) in INPUT_SIDE_KINDS
        layer.add(name, BUILDERS[method](layer.base_layer, **options), scale)
        if layer is not module:
            _set_module(model, path, layer)
    if hasattr(BUILDERS[method], "after_inject"):  # Compacter's shared rules, AdapterFusion's task adapters
        BUILDERS[method].after_inject(model, paths, name)
    if freeze:
        freeze_base(model)
    return paths


def _inject_selective(
    model: nn.Module, method: str, targets: str | Sequence[str] | None, name: str, freeze: bool
) -> list[str]:
    matches = None
    if method == "unfreeze":
        if not targets:
            raise UserError("unfreeze needs targets: parameter names or a regex (e.g. 'mid_block\\..*')")
        patterns = [targets] if isinstance(targets, str) else list(targets)
        all_names = [n for n, _ in model.named_parameters()]
        matches = [n for n in all_names if any(n == p or re.fullmatch(p, n) for p in patterns)]
        if not matches:
            raise UserError(f"unfreeze targets {patterns} match no parameter; e.g. {', '.join(all_names[:3])}")
    names = selective.selective_parameter_names(model, method, matches)
    if not names:
        raise UserError(f"{method}: this {type(model).__name__} has no parameters of that kind")
    taken = {n for adapter in selective.registry(model).values() for n in adapter.originals}
    if taken & set(names):
        raise UserError(
            f"{method}: parameters already trained by another selective adapter: {sorted(taken & set(names))[:3]}"
        )
    selective.registry(model)[name] = selective.attach(model, method, names)
    if freeze:
        freeze_base(model)
    return names


def _inject_difffit(
    model: nn.Module, targets: str | Sequence[str] | None, name: str, scale: float, freeze: bool
) -> list[str]:
    """DiffFit: a gamma on every residual branch's output layer (wrapped), then biases and norms (selective)."""
    paths = select(model, targets or difffit.branch_targets(model))
    for path in paths:
        module = model.get_submodule(path)
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
        layer.add(name, difffit.DiffFitScale(layer.base_layer), scale)
        if layer is not module:
            _set_module(model, path, layer)
    found = selective.selective_parameter_names(model, "bitfit") + selective.selective_parameter_names(model, "norm")
    names = difffit.selected_parameters(model, found)
    taken = {n for adapter in selective.registry(model).values() for n in adapter.originals}
    if taken & set(names):
        raise UserError(f"difffit: parameters already trained by another selective adapter: {sorted(taken)[:3]}")
    selective.registry(model)[name] = selective.attach(model, "difffit", names)
    if scale != 1.0:
        selective.apply_scale(model, selective.registry(model)[name], float(scale))
    if freeze:
        freeze_base(model)
    return paths + names


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    """Scale adapter `name` (0 disables it; merged adapters must be unmerged first)."""
    _require(model, name)
    for path, layer in _layers(model, name):
        if name in layer.merged:
            raise UserError(f"adapter '{name}' is merged into {path}; unmerge it before changing its scale")
        layer.scales[name] = float(scale)
    if name in selective.registry(model):
        selective.apply_scale(model, selective.registry(model)[name], float(scale))
    if name in prompt.names(model):
        prompt.set_scale(model, name, float(scale))


def _fold_one(layer: AdapterLayer, name: str, into: bool) -> torch.Tensor:
    adapter, scale = layer.adapters[name], layer.scales[name]
    weight = dequantized_weight(layer.base_layer).detach()
    with torch.no_grad():
        return adapter.merged(weight, scale) if into else adapter.unmerged(weight, scale)


def _all_finite(tensor: torch.Tensor) -> bool:
    """A NaN/inf anywhere makes the fp32 sum non-finite: one read of the weight, no boolean copy of it."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32)))


def _fold(model: nn.Module, name: str | None, into: bool) -> list[str]:
    done: list[tuple[str, AdapterLayer, str]] = []
    for path, layer in _layers(model, name):
        for adapter_name in [name] if name else list(layer.adapters):
            if (adapter_name in layer.merged) == into:
                continue
            new = _fold_one(layer, adapter_name, into)
            if not _all_finite(new):
                for _, done_layer, done_name in reversed(done):  # undo what this call changed
                    write_weight(done_layer.base_layer, _fold_one(done_layer, done_name, not into))
                    _toggle(done_layer, done_name, not into)
                raise UserError(
                    f"merging adapter '{adapter_name}' into {path} gives NaN/inf weights; nothing was merged "
                    "(the adapter is probably corrupt or trained with a diverged loss)"
                )
            if into and quant_mode(layer.base_layer):
                warn_requantize(path)
            write_weight(layer.base_layer, new)
            _toggle(layer, adapter_name, into)
            done.append((path, layer, adapter_name))
    return [path for path, *_ in done]


def _toggle(layer: AdapterLayer, name: str, merged: bool) -> None:
    if merged:
        layer.merged.append(name)
    else:
        layer.merged.remove(name)


def merge(model: nn.Module, name: str | None = None) -> list[str]:
    """Fold adapter `name` (all when None) into the base weights; NaN/inf results are refused."""
    if name is not None:
        _require(model, name)
        if name in prompt.names(model):
            raise UserError(f"'{name}' is a prompt adapter: it adds tokens, there are no weights to merge it into")
    return _fold(model, name, into=True)


def unmerge(model: nn.Module, name: str | None = None) -> list[str]:
    """Undo `merge` (exact up to floating point rounding; re-quantizes 4-bit bases)."""
    if name is not None:
        _require(model, name)
    return _fold(model, name, into=False)


def remove(model: nn.Module, name: str | None = None) -> None:
    """Detach adapter `name` (all when None); a layer left with no adapter is unwrapped.

    An adapter that is merged stays folded in the weights (merge + remove = "merge and unload")."""
    if name is not None:
        _require(model, name)
    registry = selective.registry(model)  # first: its parameter names still have the wrapped layers' paths
    for adapter_name in [name] if name else list(registry):
        if adapter_name in registry:
            selective.detach(model, registry.pop(adapter_name))
    for path, layer in _layers(model, name):
        for adapter_name in [name] if name else list(layer.adapters):
            del layer.adapters[adapter_name]
            del layer.scales[adapter_name]
            if adapter_name in layer.merged:
                layer.merged.remove(adapter_name)
        if not len(layer.adapters):
            _set_module(model, path, layer.base_layer)
    for adapter_name in [name] if name else prompt.names(model):
        if adapter_name in prompt.names(model):
            prompt.detach(model, adapter_name)


def state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name` as {"<module path>.<param name>": tensor} (detached, on the model's device)."""
    _require(model, name)
    out = {
        f"{path}.{key}": value.detach()
        for path, layer in _layers(model, name)
        for key, value in layer.adapters[name].state_dict().items()
    }
    if name in selective.registry(model):
        parameters = dict(model.named_parameters())
        out.update({n: parameters[n].detach() for n in selective.registry(model)[name].originals})
    if name in prompt.names(model):
        adapter = prompt.registry(model)[name]
        out.update(
            adapter.tensors() if hasattr(adapter, "tensors") else {prompt.STATE_KEY: adapter.prompt_embeddings.detach()}
        )
    return out


def _key_errors(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
    for key in sorted(set(expected) & set(given)):
        if tuple(expected[key].shape) != tuple(given[key].shape):
            problems.append(f"{key} has shape {tuple(given[key].shape)}, expected {tuple(expected[key].shape)}")
            break
    return problems


def load_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], name: str = "default") -> None:
    """Load values into the already-injected adapter `name`; strict about keys and shapes."""
    expected = state_dict(model, name)
    problems = _key_errors(expected, tensors)
    if problems:
        raise UserError(f"adapter '{name}' does not fit these weights: {'; '.join(problems)}")
    for path, layer in _layers(model, name):
        prefix = path + "."
        own = layer.adapters[name].state_dict().keys()  # not the layer's own (selective) parameters
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix) :] in own}
        layer.adapters[name].load_state_dict(sub, strict=True)
    if name in selective.registry(model):
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for n in selective.registry(model)[name].originals:
                parameters[n].copy_(tensors[n])
    if name in prompt.names(model):
        adapter = prompt.registry(model)[name]
        if hasattr(adapter, "load_tensors"):
            adapter.load_tensors(dict(tensors))
        else:
            with torch.no_grad():
                adapter.prompt_embeddings.copy_(tensors[prompt.STATE_KEY])


def trainable_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The parameters an optimizer should get: adapter weights (and selected ones) that require grad."""
    params: dict[int, nn.Parameter] = {}
    for _, layer in _layers(model, name):
        for adapter_name, adapter in layer.adapters.items():
            if name is None or adapter_name == name:
                params.update({id(p): p for p in adapter.parameters() if p.requires_grad})
    parameters = dict(model.named_parameters())
    for adapter_name, adapter in selective.registry(model).items():
        if name is None or adapter_name == name:
            params.update({id(parameters[n]): parameters[n] for n in adapter.originals if parameters[n].requires_grad})
    for adapter_name in prompt.names(model):
        if name is None or adapter_name == name:
            params.update({id(p): p for p in prompt.registry(model)[adapter_name].parameters() if p.requires_grad})
    return list(params.values())
