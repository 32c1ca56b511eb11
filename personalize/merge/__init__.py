"""`personalize merge`: several adapters -> one LoRA (diffusers + kohya, or peft for LLMs), or a base model.

    from personalize.merge import merge_adapters
    result = merge_adapters(["a.safetensors:0.7", "out/b"], method="svd", rank=32, output="merged")
    result.files, result.errors["overall"]

Layers stream one at a time (see inputs.py); the per-layer arithmetic is `personalize.adapters.merge_ops`.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personalize.adapters.merge_ops import METHODS
from personalize.errors import UserError
from personalize.merge.inputs import LayerReader, MergeInput, StagedInput, parse_input, stage
from personalize.merge.layers import Merged, Term, merge_layer, overall_error, term_of


@dataclass
class MergeResult:
    files: list[Path]
    errors: dict[str, float]  # "<component>.<module path>" -> relative error, and "overall"
    method: str
    rank: int | None
    layers: int
    notes: list[str] = field(default_factory=list)


def _inputs(specs: Sequence[str | MergeInput | tuple[str, float]]) -> list[MergeInput]:
    out = []
    for spec in specs:
        if isinstance(spec, MergeInput):
            out.append(spec)
        elif isinstance(spec, tuple):
            out.append(MergeInput(str(spec[0]), float(spec[1])))
        else:
            out.append(parse_input(str(spec)))
    return out


def _check(method: str, inputs: list[MergeInput], rank: int | None, density: float, into_base: bool, base: Any) -> None:
    if method not in METHODS:
        raise UserError(f"unknown merge method '{method}'; choose one of {', '.join(METHODS)}")
    if not inputs:
        raise UserError("nothing to merge: give at least one adapter")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1 (got {rank})")
    if not 0.0 < density <= 1.0:
        raise UserError(f"--density must be in (0, 1] (got {density})")
    if into_base and base is None:
        raise UserError("--into-base needs the base model (--base MODEL) to merge into")
    if method == "fusion" and base is None:
        raise UserError("--method fusion runs the base model on each subject's prompts; pass --base MODEL")


def _layer_generator(seed: int, module: str) -> torch.Generator:
    """One generator per layer, seeded from (seed, layer name): the masks do not depend on the layer order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


def base_layer_of(targets: Mapping[str, nn.Module] | None, module: str) -> nn.Module | None:
    if targets is None:
        return None
    component, _, path = module.partition(".")
    if component not in targets:
        raise UserError(f"the inputs have weights for {component}, which the base model does not have")
    layer = targets[component].get_submodule(path)
    return getattr(layer, "base_layer", layer)


def merge_adapters(
    inputs: Sequence[str | MergeInput | tuple[str, float]],
    *,
    method: str = "svd",
    rank: int | None = None,
    density: float = 1.0,
    seed: int = 0,
    base: Any = None,
    into_base: bool = False,
    output: str | Path,
    prompts: Sequence[Sequence[str]] | None = None,
    regularization: float = 1e-3,
    fusion_steps: int = 10,
    family: str | None = None,
    allow_pickle: bool = False,
) -> MergeResult:
    """Merge adapters (any layout; `PATH[:WEIGHT]`, MergeInput or (path, weight)) into `output`.

    `base`: a loaded pipeline / model or a model name (needed for LoHa/LoKr/KronA/DoRA/IA3 inputs,
    --into-base and fusion). `prompts`: per input, the prompts fusion runs the base on (default: the
    prompts of each input's training run, from its config.yaml and captions); `fusion_steps` denoising
    steps per prompt record the UNet layers' inputs; `regularization` is fusion's ridge weight."""
    from personalize.formats.cli import load_model
    from personalize.formats.io import model_components

    items = _inputs(inputs)
    _check(method, items, rank, density, into_base, base)
    model = load_model(base) if isinstance(base, (str, Path)) else base
    targets = model_components(model) if model is not None else None
    from personalize.merge.output import BaseSink, LoraSink, write_into_base, write_lora

    caller_owns_base = model is base  # a base the caller passed in comes back unchanged
    with tempfile.TemporaryDirectory(prefix="personalize-merge-") as scratch:
        staged = stage(items, model, Path(scratch), allow_pickle=allow_pickle)
        sink = BaseSink(targets, restore=caller_owns_base) if into_base else LoraSink(_dtype(staged))  # type: ignore[arg-type]

        def merge_all(modules: list[str] | None, grams: Any, to: Callable[[str, Merged], None]) -> tuple[dict, dict]:
            return _merge_all(
                staged, method, rank, density, seed, targets, into_base, grams, regularization, to, modules
            )

        try:
            if method == "fusion":
                from personalize.merge.fusion import fuse_all, subject_prompts

                texts = [list(p) for p in prompts] if prompts is not None else [subject_prompts(s) for s in staged]
                errors, norms = fuse_all(model, staged, texts, merge_all, sink, fusion_steps, seed)
            else:
                errors, norms = merge_all(None, None, sink)
        except BaseException:
            if isinstance(sink, BaseSink):
                sink.restore_weights()
            raise
    errors["overall"] = overall_error(errors, norms)
    report = {
        "method": method,
        "rank": rank,
        "density": density,
        "seed": seed,
        "inputs": [{"path": s.source.path, "weight": s.source.weight, "layout": s.layout} for s in staged],
        "relative_error": errors,
    }
    output = Path(output)
    if isinstance(sink, BaseSink):
        try:
            files = write_into_base(model, staged, output, report)
        finally:
            sink.restore_weights()
    else:
        family = family or _family(staged, model)
        files = write_lora(staged, sink.components, output, family, method, rank, model, report)
    return MergeResult(files, errors, method, rank, len(norms))


def _dtype(staged: list[StagedInput]) -> torch.dtype:
    """The widest floating dtype among the inputs' tensors (fp16 inputs give an fp16 merge)."""
    from safetensors import safe_open

    dtypes = set()
    for item in staged:
        with safe_open(str(item.file), framework="pt") as handle:
            for key in list(handle.keys())[:8]:
                dtypes.add(handle.get_slice(key).get_dtype())
    order = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float32}
    found = [order[d] for d in dtypes if d in order]
    if torch.float32 in found or (torch.float16 in found and torch.bfloat16 in found) or not found:
        return torch.float32
    return found[0]


def _family(staged: list[StagedInput], model: Any) -> str:
    if model is not None:
        from personalize.models import detect_family

        try:
            return detect_family(model)
        except UserError:
            pass
    return staged[0].family or "sd1"


def _merge_all(
    staged: list[StagedInput],
    method: str,
    rank: int | None,
    density: float,
    seed: int,
    targets: Mapping[str, nn.Module] | None,
    full: bool,
    grams: Mapping[str, list[torch.Tensor | None]] | None,
    regularization: float,
    sink: Callable[[str, Merged], None],
    modules: list[str] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Merge every layer (or `modules`), one at a time, and hand each result to `sink`; returns (errors, norms)."""
    errors: dict[str, float] = {}
    norms: dict[str, float] = {}
    with LayerReader(staged) as reader:
        for module in modules if modules is not None else reader:
            base_layer = base_layer_of(targets, module)
            every: list[Term | None] = [
                None if group is None else term_of(group, item.source.weight, base_layer, module)
                for item, group in zip(staged, reader.layer(module))
            ]
            terms = [t for t in every if t is not None]
            conv_like = _conv_like(base_layer)
            if method == "fusion":
                from personalize.merge.fusion import fuse_layer

                assert grams is not None
                result = fuse_layer(every, grams[module], rank, full, regularization, conv_like)
            else:
                result = merge_layer(terms, method, rank, density, _layer_generator(seed, module), full, conv_like)
            errors[module], norms[module] = result.error, result.norm
            sink(module, result)
    return errors, norms


def _conv_like(base_layer: nn.Module | None) -> torch.Tensor | None:
    """A stand-in with a conv LoRA down's layout (r, in, kh, kw), for reshaping SVD factors."""
    if isinstance(base_layer, nn.Conv2d):
        return torch.empty(1, *base_layer.weight.shape[1:], device="meta")
    return None


__all__ = ["MergeInput", "MergeResult", "merge_adapters", "parse_input"]
