"""Mix-of-Show gradient fusion (Gu et al. 2023, arXiv 2305.18292) over a whole pipeline.

For each subject i, its adapter (and tokens) is loaded onto the base and the pipeline runs its prompts
for a few denoising steps; a hook on every merged layer accumulates that subject's input Gram matrix
G_i = X_i X_i^T (in x in; convolutions: of the unfolded input patches), so nothing grows with the number
of tokens. Each layer is then fused in closed form (`personalize.adapters.merge_ops.fusion_delta`):

    W* - W0 = (sum_i w_i dW_i G_i)(sum_i G_i + lam I)^-1

A subject without weights at a layer still counts there, with dW_i = 0: its model has the base weight.
As in Mix-of-Show, X_i are the inputs the subject's own model sees (text encoder layers: its prompts;
UNet layers: the denoising of its prompts), and the result is then compressed to rank R (or kept full).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.adapters import merge_ops as ops
from personalize.errors import UserError
from personalize.merge.inputs import StagedInput
from personalize.merge.layers import Merged, Term, exact_delta, merge_layer

DEFAULT_STEPS = 10


def subject_prompts(staged: StagedInput) -> list[str]:
    """The prompts a subject trained on: its run's instance prompt and captions (from OUT/config.yaml), else
    "a photo of <token>" for each of its tokens."""
    from personalize.config import read_yaml_file

    folder = Path(staged.source.path)
    config_file = folder / "config.yaml" if folder.is_dir() else None
    if config_file is not None and config_file.is_file():
        from personalize.config import from_dict
        from personalize.data import DataConfig
        from personalize.data.sources import candidates, instance_prompt, subsets_of

        data = read_yaml_file(config_file).get("data") or {}
        config = from_dict(DataConfig, data, prefix="data.")
        prompts = [instance_prompt(config)]
        try:
            for subset in subsets_of(config):
                if not subset.is_class:
                    prompts += [c.prompt for c in candidates(subset, config.token)]
        except UserError:  # the training images moved: the instance prompt is still the subject's
            pass
        return list(dict.fromkeys(prompts))
    if staged.embeddings:
        from personalize.pipelines.layerwise import layer_token, layered_triggers

        triggers = layered_triggers(staged.embeddings)  # ED-LoRA: '<tok>@l' are layer copies of '<tok>'
        copies = {layer_token(t, layer) for t, count in triggers.items() for layer in range(1, count)}
        return [f"a photo of {token}" for token in staged.embeddings if token not in copies]
    raise UserError(
        f"fusion needs the prompts {staged.source.path} was trained on and it has no config.yaml or tokens; "
        "pass them with --prompts FILE (one line per prompt), once per input"
    )


class GramRecorder:
    """Forward hooks that add x^T x of each hooked layer's input to a running (in, in) sum."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rows = _rows(getattr(module, "base_layer", module), args[0].detach().float())  # (N, in)
            gram = rows.T @ rows  # (in, in)
            self.grams[name] = self.grams[name] + gram if name in self.grams else gram

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return self.grams


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows the weight multiplies: (..., in) for Linear, unfolded patches for Conv2d."""
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, in*k*k, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if isinstance(layer, nn.Embedding):
        raise UserError("fusion does not apply to embedding layers (their inputs are token ids); use svd")
    return x.reshape(-1, x.shape[-1])


def collect_grams(
    pipe: Any,
    staged: list[StagedInput],
    prompts: list[list[str]],
    modules: list[str],
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    text_only: bool = False,
) -> dict[str, list[torch.Tensor | None]]:
    """{"<component>.<path>": [G_subject_0, G_subject_1, ...]} for `modules`, each subject's adapter loaded.

    `text_only` encodes the prompts (text encoder layers); otherwise the pipeline denoises them, with the
    subjects' own text-encoder adapters switched off (a fused text encoder, loaded by the caller, stands
    in for them, as in Mix-of-Show's second stage)."""
    from personalize import adapters
    from personalize.formats.io import model_components
    from personalize.pipelines import load_adapter, unload_adapter

    targets = model_components(pipe)
    grams: dict[str, list[torch.Tensor | None]] = {m: [] for m in modules}
    for index, (item, texts) in enumerate(zip(staged, prompts)):
        name = f"fusion-subject-{index}"
        load_adapter(pipe, item.source.path, scale=item.source.weight, name=name)
        try:
            if not text_only:
                for component, module in targets.items():
                    if component.startswith("text_encoder") and name in adapters.describe(module):
                        adapters.set_scale(module, name, 0.0)
            layers = {m: targets[m.partition(".")[0]].get_submodule(m.partition(".")[2]) for m in modules}
            recorder = GramRecorder(layers)
            try:
                _run(pipe, texts, steps, seed, text_only)
            finally:
                found = recorder.close()
        finally:
            unload_adapter(pipe, name)
        for module in modules:
            grams[module].append(found.get(module))
    return grams


@torch.no_grad()
def _run(pipe: Any, prompts: list[str], steps: int, seed: int, text_only: bool) -> None:
    """Encode the prompts, or denoise them for `steps` steps as generation does, classifier-free guidance
    included: the unconditional branch runs through every subject's layers at inference too. Both go through
    the pipeline's own `encode_prompt` (multi-vector tokens expanded; ED-LoRA tokens once per layer)."""
    if text_only:
        if callable(getattr(pipe, "encode_prompt", None)):
            device = getattr(pipe, "_execution_device", None) or pipe.device
            pipe.encode_prompt(
                prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        else:
            from personalize.models.encode import encode_text

            encode_text(pipe, prompts)
        return
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompts, num_inference_steps=steps, generator=generator, output_type="latent")


MergeAll = Callable[[list[str], Mapping[str, list], Callable[[str, Merged], None]], tuple[dict, dict]]


def fuse_all(
    pipe: Any,
    staged: list[StagedInput],
    prompts: list[list[str]],
    merge_all: MergeAll,
    sink: Callable[[str, Merged], None],
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, float]]:
    """Mix-of-Show's two stages: fuse the text encoders on each subject's own inputs; then, with the fused
    text encoders loaded, record and fuse the denoiser's layers. `merge_all(modules, grams, sink)` merges
    the given modules layer by layer (personalize.merge._merge_all). Returns (errors, norms)."""
    from personalize.pipelines import load_adapter, unload_adapter

    if isinstance(pipe, nn.Module) or not hasattr(pipe, "components"):
        raise UserError("--method fusion runs a diffusion pipeline; for language models use svd, ties or dare")
    if len(prompts) != len(staged):
        raise UserError(f"fusion got prompts for {len(prompts)} subjects but {len(staged)} inputs")
    for item, texts in zip(staged, prompts):
        if not texts:
            raise UserError(f"no prompts for {item.source.path}; fusion needs at least one")
    modules = list(dict.fromkeys(m for s in staged for m in s.modules))
    text = [m for m in modules if m.startswith("text_encoder")]
    rest = [m for m in modules if m not in text]
    fused_text: dict[str, dict[str, torch.Tensor]] = {}
    held: list[tuple[str, Merged]] = []  # handed to `sink` at the end: it may fold them into the base

    def keep_text(module: str, merged: Merged) -> None:
        """Hold the result, and keep the fused delta exactly (full-rank factors) for the second stage."""
        held.append((module, merged))
        assert merged.delta is not None
        down, up, _ = ops.svd_of_delta(merged.delta, rank=min(merged.delta.shape))
        component, _, path = module.partition(".")
        sd = fused_text.setdefault(component, {})
        sd[f"{path}.lora_down.weight"], sd[f"{path}.lora_up.weight"] = down, up
        sd[f"{path}.alpha"] = torch.tensor(float(down.shape[0]))

    errors, norms = {}, {}
    if text:
        grams = collect_grams(pipe, staged, prompts, text, steps, seed, text_only=True)
        errors, norms = merge_all(text, grams, keep_text)
    if rest:
        name = load_adapter(pipe, fused_text, name="fusion-text") if fused_text else None
        try:
            grams = collect_grams(pipe, staged, prompts, rest, steps, seed)
        finally:
            if name:
                unload_adapter(pipe, name)
        more_errors, more_norms = merge_all(rest, grams, sink)
        errors, norms = {**errors, **more_errors}, {**norms, **more_norms}
    for module, merged in held:
        sink(module, merged)
    return errors, norms


def fuse_layer(
    terms: list[Term | None],
    grams: list[torch.Tensor | None],
    rank: int | None,
    full: bool,
    regularization: float,
    conv_like: torch.Tensor | None,
) -> Merged:
    """Fuse one layer from every subject's term (None: no weights there) and Gram matrix (None: never ran)."""
    present = [t for t in terms if t is not None]
    pairs = [(t, g) for t, g in zip(terms, grams) if g is not None]
    if not pairs:  # the layer never ran on any prompt: nothing constrains it, keep the plain sum
        merged = merge_layer(present, "linear", rank, 1.0, None, True, conv_like)
        if full:
            return merged
        assert merged.delta is not None
        down, up, singular = ops.svd_of_delta(merged.delta, rank or max(t.rank for t in present) or 1)
        down, up = _as_conv(down, up, conv_like, present)
        return Merged(down, up, merged.delta, ops.tail_error(singular, down.shape[0]), merged.norm)
    shape = present[0].flat().shape
    deltas = [t.flat() * t.weight if t is not None else torch.zeros(shape) for t, _ in pairs]
    fused = ops.fusion_delta(deltas, [g for _, g in pairs], regularization)  # (out, in*k)
    exact = exact_delta(present)
    norm = float(exact.norm())
    if full:
        return Merged(None, None, fused, ops.relative_error(fused, exact), norm)
    # the full fused delta travels along (the second stage of fuse_all runs on the fused text encoder)
    target = rank or max(t.rank for t in present) or 0
    if not target:
        raise UserError("none of the inputs is a LoRA here, so there is no rank to keep; pass --rank R")
    down, up, _ = ops.svd_of_delta(fused, target)
    error = ops.relative_error(ops.flat_delta(down, up), exact)
    down, up = _as_conv(down, up, conv_like, present)
    return Merged(down, up, fused, error, norm)


def _as_conv(
    down: torch.Tensor, up: torch.Tensor, conv_like: torch.Tensor | None, present: list[Term]
) -> tuple[torch.Tensor, torch.Tensor]:
    like = conv_like if conv_like is not None else next((t.down for t in present if t.down is not None), None)
    if like is not None and like.dim() == 4:
        return down.reshape(down.shape[0], *like.shape[1:]), up.reshape(*up.shape, 1, 1)
    return down, up
