"""Layer-wise token embeddings (ED-LoRA, Mix-of-Show: Gu et al. 2023, arXiv 2305.18292) on a stock pipeline.

An ED-LoRA trigger `<dog>` has its own embedding vectors for each cross-attention layer of the UNet
(Mix-of-Show: one per layer, 16 on SD1.5, counted through the down blocks, the mid block, then the up
blocks). Layer l's vectors are the Textual Inversion token `<dog>@l` (layer 0 is `<dog>` itself), so the
files, the tokenizers and the loading stay those of Textual Inversion. A prompt is encoded once per
layer, copy l with `<dog>` replaced by `<dog>@l`, and the L encodings are joined along the sequence axis;
cross-attention layer l reads its own slice:

    E = [enc(prompt_0), enc(prompt_1), ..., enc(prompt_{L-1})]    (B, L*T, C)
    cross-attention layer l:  E[:, l*T:(l+1)*T]                     (B, T, C)

Prompts without a trigger are encoded once and repeated. `install` wraps the pipeline's `encode_prompt`
and puts a pre-hook on each cross-attention layer; `remove` takes both off again;
`personalize.pipelines.load_adapter` calls `rebuild` whenever the loaded tokens change.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from personalize.errors import UserError

SEPARATOR = "@"
STATE_ATTRIBUTE = "_personalize_layerwise"
PROMPT_ARGUMENTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2")
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # Mix-of-Show's layer numbering


def layer_token(token: str, layer: int) -> str:
    """The token of `layer`'s vectors: '<dog>' for layer 0, '<dog>@3' for layer 3."""
    return token if layer == 0 else f"{token}{SEPARATOR}{layer}"


def layered_triggers(tokens: Iterable[str]) -> dict[str, int]:
    """{trigger: layers} of the tokens that come with layer copies ('<dog>', '<dog>@1', ..., '<dog>@{L-1}')."""
    names = set(tokens)
    found: dict[str, int] = {}
    for name in names:
        match = re.fullmatch(rf"(.+){SEPARATOR}(\d+)", name)
        if match and match.group(1) in names:
            found[match.group(1)] = max(found.get(match.group(1), 1), int(match.group(2)) + 1)
    for trigger, layers in found.items():
        missing = [layer for layer in range(1, layers) if layer_token(trigger, layer) not in names]
        if missing:
            raise UserError(
                f"the layer-wise token '{trigger}' lacks the vectors of layer(s) {missing[:5]}; the embeddings file "
                "is incomplete (an ED-LoRA run writes one token per cross-attention layer)"
            )
    return found


def cross_attention_paths(unet: nn.Module) -> list[str]:
    """Module paths of the UNet's cross-attention layers in Mix-of-Show's order: down, mid, up blocks."""
    paths = [
        path
        for path, module in unet.named_modules()
        if path.rsplit(".", 1)[-1] == "attn2" and getattr(module, "is_cross_attention", False)
    ]
    return sorted(paths, key=lambda path: _BLOCK_ORDER.get(path.split(".", 1)[0], len(_BLOCK_ORDER)))


def rewrite(text: Any, triggers: Iterable[str], layer: int) -> Any:
    """A prompt (or list of prompts) with each trigger replaced by its layer-`layer` token."""
    if isinstance(text, (list, tuple)):
        return [rewrite(item, triggers, layer) for item in text]
    if not isinstance(text, str) or layer == 0:
        return text
    for trigger in triggers:  # never a token's own vector names ('<dog>_1') or another layer's ('<dog>@2')
        text = re.sub(re.escape(trigger) + rf"(?![{SEPARATOR}_]\d)", layer_token(trigger, layer), text)
    return text


def join_layers(parts: list[Any]) -> Any:
    """The per-layer encodings joined: (B, T, C) tensors along the sequence axis, anything else (pooled
    embeddings, None) from layer 0. Tensors, tuples and dicts of them."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=1) if first.dim() == 3 else first
    if isinstance(first, (tuple, list)):
        return type(first)(join_layers([part[index] for part in parts]) for index in range(len(first)))
    if isinstance(first, dict):
        return {key: join_layers([part[key] for part in parts]) for key in first}
    return first


def _sequence_length(encoded: Any) -> int:
    if isinstance(encoded, torch.Tensor):
        return int(encoded.shape[1]) if encoded.dim() == 3 else 0
    values = encoded.values() if isinstance(encoded, dict) else encoded if isinstance(encoded, (tuple, list)) else []
    return next((length for length in map(_sequence_length, values) if length), 0)


@dataclass
class Layerwise:
    """What `install` put on a pipeline."""

    triggers: dict[str, int]
    layers: int
    length: int = 0  # T: the sequence length of one layer's encoding, set by each encoding
    handles: list[Any] = field(default_factory=list)

    def encode(self, encode_layer: Callable[[int], Any], needed: bool = True) -> Any:
        """encode_layer(l) for every layer, joined; one call repeated when no prompt holds a trigger."""
        first = encode_layer(0)
        parts = [first, *(encode_layer(layer) for layer in range(1, self.layers))] if needed else [first] * self.layers
        self.length = _sequence_length(first)
        return join_layers(parts)


def state_of(pipe: Any) -> Layerwise | None:
    return pipe.__dict__.get(STATE_ATTRIBUTE)


def check(pipe: Any, tokens: Iterable[str]) -> dict[str, int]:
    """The layered triggers among `tokens`, each checked against the pipeline's cross-attention layers."""
    triggers = layered_triggers(tokens)
    if not triggers:
        return triggers
    unet = getattr(pipe, "unet", None)
    layers = len(cross_attention_paths(unet)) if isinstance(unet, nn.Module) else 0
    if not layers:
        raise UserError(
            f"'{next(iter(triggers))}' is a layer-wise (ED-LoRA) token, which needs a UNet with cross-attention; "
            f"this {type(pipe).__name__} has none"
        )
    for trigger, count in triggers.items():
        if count != layers:
            raise UserError(
                f"the ED-LoRA token '{trigger}' has vectors for {count} cross-attention layers, but this UNet has "
                f"{layers}; is it for another base model?"
            )
    return triggers


def install(pipe: Any, triggers: dict[str, int]) -> Layerwise:
    """Layer-wise encoding of `triggers` on `pipe` (see the module doc); replaces an earlier install."""
    remove(pipe)
    unet = pipe.unet
    paths = cross_attention_paths(unet)
    state = Layerwise(dict(triggers), len(paths))
    for index, path in enumerate(paths):
        hook = _slice_hook(state, index)
        state.handles.append(unet.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    original = getattr(pipe, "encode_prompt", None)
    if callable(original):
        pipe.__dict__["encode_prompt"] = _layerwise_encode_prompt(state, original)
    pipe.__dict__[STATE_ATTRIBUTE] = state
    return state


def remove(pipe: Any) -> None:
    state = pipe.__dict__.pop(STATE_ATTRIBUTE, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    pipe.__dict__.pop("encode_prompt", None)


def rebuild(pipe: Any, tokens: Iterable[str]) -> None:
    """Make the layer-wise encoding cover exactly the layered triggers among the loaded `tokens`."""
    triggers = check(pipe, tokens)
    if triggers:
        install(pipe, triggers)
    else:
        remove(pipe)


def encode_texts(pipe: Any, prompts: list[str], encode: Callable[[list[str]], Any]) -> Any:
    """encode(prompts), layer by layer and joined when layer-wise tokens are installed on `pipe`."""
    state = state_of(pipe)
    if state is None:
        return encode(prompts)
    triggers = list(state.triggers)
    needed = rewrite(prompts, triggers, 1) != list(prompts)
    return state.encode(lambda layer: encode(rewrite(prompts, triggers, layer)), needed)


def _slice_hook(state: Layerwise, index: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = "encoder_hidden_states" not in kwargs and len(args) > 1
        joined = args[1] if positional else kwargs.get("encoder_hidden_states")
        if joined is None or not state.length or joined.shape[1] != state.layers * state.length:
            return None  # not a layer-wise encoding (prompt embeddings passed in directly)
        start = index * state.length
        own = joined[:, start : start + state.length]  # (B, T, C)
        if positional:
            return (args[0], own, *args[2:]), kwargs
        return args, {**kwargs, "encoder_hidden_states": own}

    return hook


def _layerwise_encode_prompt(state: Layerwise, original: Callable[..., Any]) -> Callable[..., Any]:
    """The pipeline's own encode_prompt (prompt conversion, CFG, clip skip all kept), once per layer."""
    signature = inspect.signature(original)

    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        texts = {name: bound.arguments[name] for name in PROMPT_ARGUMENTS if bound.arguments.get(name) is not None}
        triggers = list(state.triggers)
        needed = any(rewrite(text, triggers, 1) != text for text in texts.values())

        def encode_layer(layer: int) -> Any:
            for name, text in texts.items():
                bound.arguments[name] = rewrite(text, triggers, layer)
            return original(*bound.args, **bound.kwargs)

        return state.encode(encode_layer, needed)

    encode_prompt.__signature__ = signature  # type: ignore[attr-defined]
    return encode_prompt
