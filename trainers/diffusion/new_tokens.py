"""New tokens for Textual Inversion (Gal et al., arXiv 2208.01618) and pivotal tuning: pure helpers and modules.

A token with n vectors is n tokenizer entries "<tok>", "<tok>_1", ..., "<tok>_{n-1}" (diffusers'
convention: `pipe.maybe_convert_prompt` and `pipe.load_textual_inversion` expand and load the same
names), and a prompt's "<tok>" is expanded to "<tok> <tok>_1 ..." before tokenizing.

Training never touches the text encoder's embedding matrix: `RowsEmbedding` wraps a frozen copy of it
(extended by the new ids) and replaces the rows of the new ids by a small trainable (n, d) matrix
held in `NewRows`, so every other row stays bit-identical by construction (no gradient, no optimizer
state, no weight decay ever reaches it), the optimizer state is n x d, and checkpoints hold n x d
numbers per encoder instead of the whole vocabulary.

    E'[i] = rows[i - first]   for first <= i < first + n
    E'[i] = E[i]              otherwise
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from personalize.errors import UserError
from personalize.pipelines.embeddings import token_names
from personalize.pipelines.layerwise import layer_token

# Prompts for images without a caption (the paper's learnable property): "{}" is the new token.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a photo of a small {}",
    "a photo of the large {}",
    "a clean photo of a {}",
    "a blurry photo of the {}",
    "a rendition of the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a picture in the style of {}",
    "an artwork in the style of {}",
    "a rendering in the style of {}",
    "a drawing in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a dark picture in the style of {}",
    "a good painting in the style of {}",
    "a small painting in the style of {}",
    "a large artwork in the style of {}",
    "a sketch in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def expand_prompt(prompt: str, token: str, vectors: int) -> str:
    """'a photo of <tok>' -> 'a photo of <tok> <tok>_1 ... <tok>_{n-1}' (what maybe_convert_prompt does)."""
    if vectors <= 1:
        return prompt
    pattern = re.escape(token) + r"(?!_\d)"  # never re-expand an already expanded '<tok>_1'
    return re.sub(pattern, lambda _: " ".join(token_names(token, vectors)), prompt)


def template_prompt(property_: str, token: str, generator: torch.Generator | None = None) -> str:
    """A template of the learnable property filled with the token; the first one without a generator."""
    templates = TEMPLATES[property_]
    index = 0 if generator is None else int(torch.randint(len(templates), (1,), generator=generator))
    return templates[index].format(token)


def check_new(tokenizer: Any, names: Sequence[str]) -> None:
    """A new token must not be a word the tokenizer already knows (its meaning would be overwritten)."""
    vocabulary = tokenizer.get_vocab()
    for name in names:
        if name in vocabulary or f"{name}</w>" in vocabulary:
            raise UserError(
                f"the token '{name}' is already in the vocabulary of {type(tokenizer).__name__}; pick a new "
                "word for --token, e.g. '<my-cat>' (angle brackets make it unique)"
            )


def add_tokens(tokenizer: Any, names: Sequence[str]) -> list[int]:
    """Add `names` to the tokenizer (in place) and return their ids (consecutive)."""
    check_new(tokenizer, names)
    tokenizer.add_tokens(list(names))
    ids = tokenizer.convert_tokens_to_ids(list(names))
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise UserError(f"the tokenizer gave the new tokens non-consecutive ids {ids}; is one of them special?")
    return ids


def init_word_ids(tokenizer: Any, init_word: str) -> list[int]:
    """Token ids of the init word(s), without the start/end tokens."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"--init-word '{init_word}' gives no token; use a plain word such as 'cat' or 'toy'")
    return list(ids)


def initial_rows(
    weight: torch.Tensor, vectors: int, init_ids: Sequence[int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, d) starting rows: vector i copies the init word's piece i mod k (a 2-vector token from 'red car'
    starts as 'red', 'car'); without an init word, N(mean, std) of the existing rows, per dimension."""
    weight = weight.detach().float()  # (V, d)
    if init_ids:
        return weight[[init_ids[index % len(init_ids)] for index in range(vectors)]].clone()  # (n, d)
    mean, std = weight.mean(dim=0), weight.std(dim=0)  # (d,)
    noise = torch.randn((vectors, weight.shape[1]), generator=generator)  # (n, d)
    return mean + std * noise


def extended_embedding(base: nn.Embedding, first_id: int, rows: torch.Tensor) -> nn.Embedding:
    """A new frozen nn.Embedding: the base rows, then `rows` at first_id.. (the matrix a stock load builds)."""
    count = max(base.num_embeddings, first_id + len(rows))
    weight = base.weight.detach()  # (V, d)
    extended = torch.empty((count, weight.shape[1]), dtype=weight.dtype, device=weight.device)  # (V', d)
    extended[: base.num_embeddings] = weight
    extended[first_id : first_id + len(rows)] = rows.detach().to(weight.device, weight.dtype)
    return nn.Embedding.from_pretrained(extended, freeze=True, padding_idx=base.padding_idx)


class NewRows(nn.Module):
    """The trainable rows of every text encoder: {component: (n, d)}; forward returns them (so that the
    module can be wrapped for data-parallel training and its gradients are all-reduced)."""

    def __init__(self, rows: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.rows = nn.ParameterDict({name: nn.Parameter(value.float().clone()) for name, value in rows.items()})

    def forward(self) -> dict[str, torch.Tensor]:
        return {name: param for name, param in self.rows.items()}


class RowsEmbedding(nn.Module):
    """Token embedding = frozen `base` (V', d) with the ids first..first+n-1 read from `rows` (n, d)."""

    def __init__(self, base: nn.Embedding, first_id: int, rows: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.use(rows)

    def use(self, rows: torch.Tensor) -> None:
        """Point at the rows tensor of this step (not registered: NewRows owns the parameter)."""
        object.__setattr__(self, "rows", rows)

    @property
    def weight(self) -> torch.Tensor:  # what code that reads `embedding.weight` expects (dtype, device, rows)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows: torch.Tensor = self.rows  # type: ignore[assignment]
        out = self.base(ids)  # (B, T, d)
        offset = ids - self.first_id  # (B, T)
        new = (offset >= 0) & (offset < len(rows))
        picked = rows[offset.clamp(0, len(rows) - 1)].to(out.dtype)  # (B, T, d)
        return torch.where(new.unsqueeze(-1), picked, out)


ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


@dataclass
class NewTokens:
    """The new token's rows on a pipeline: trainable `rows`, the wrappers in the encoders, what to put back."""

    token: str
    names: list[str]
    first_ids: dict[str, int]  # component -> id of names[0] in that component's tokenizer
    rows: NewRows
    embeddings: dict[str, RowsEmbedding]
    originals: dict[str, tuple[Any, nn.Module]] = field(default_factory=dict)  # component -> (tokenizer, embedding)
    layers: int = 1  # ED-LoRA: one set of vectors per cross-attention layer (tokens '<tok>', '<tok>@1', ...)

    @property
    def vectors(self) -> int:
        return len(self.names) // self.layers

    def use(self, rows: dict[str, torch.Tensor]) -> None:
        for component, embedding in self.embeddings.items():
            embedding.use(rows[component])

    def learned(self) -> dict[str, dict[str, torch.Tensor]]:
        """{token: {component: (n, d)}}: what personalize.formats saves as learned_embeds.safetensors."""
        parts = {name: param.detach().float().cpu() for name, param in self.rows.rows.items()}  # (L*n, d)
        n = self.vectors
        return {
            layer_token(self.token, layer): {
                name: rows[layer * n : (layer + 1) * n].contiguous() for name, rows in parts.items()
            }
            for layer in range(self.layers)
        }

    def install(self, pipe: Any) -> None:
        """Plain nn.Embeddings with the learned rows in place of the wrappers (the state a stock load gives)."""
        for component, embedding in self.embeddings.items():
            rows = self.rows.rows[component]
            getattr(pipe, component).set_input_embeddings(
                extended_embedding(embedding.base, self.first_ids[component], rows)
            )

    def restore(self, pipe: Any) -> None:
        """Put the original tokenizers and embedding modules back."""
        for component, (tokenizer, embedding) in self.originals.items():
            setattr(pipe, dict(ENCODERS)[component], tokenizer)
            getattr(pipe, component).set_input_embeddings(embedding)


def add_new_tokens(
    pipe: Any,
    token: str,
    vectors: int,
    init_word: str = "",
    generator: torch.Generator | None = None,
    layers: int = 1,
) -> NewTokens:
    """Add the token's n names to (copies of) every tokenizer and wrap every text encoder's embedding.

    `layers` > 1 (ED-LoRA): n names per layer ('<tok>', '<tok>@1', ... each with its '_i' vectors), every
    layer starting from the same rows, as Mix-of-Show initializes its layer-wise tokens.
    The pipeline's tokenizers are replaced by copies, so `restore` gives the caller's objects back."""
    names = [name for layer in range(layers) for name in token_names(layer_token(token, layer), vectors)]
    first_ids: dict[str, int] = {}
    rows: dict[str, torch.Tensor] = {}
    wrappers: dict[str, RowsEmbedding] = {}
    originals: dict[str, tuple[Any, nn.Module]] = {}
    tokenizers: dict[str, Any] = {}
    for component, tokenizer_name in ENCODERS:
        encoder = getattr(pipe, component, None)
        if encoder is None:
            continue
        original_tokenizer = getattr(pipe, tokenizer_name)
        check_new(original_tokenizer, names)
        base = encoder.get_input_embeddings()
        if not isinstance(base, nn.Embedding):
            raise UserError(f"{component}'s token embedding is a {type(base).__name__}, not nn.Embedding")
        tokenizer = copy.deepcopy(original_tokenizer)
        init_ids = init_word_ids(tokenizer, init_word) if init_word else []
        ids = add_tokens(tokenizer, names)
        rows[component] = initial_rows(base.weight, vectors, init_ids, generator).repeat(layers, 1)  # (L*n, d)
        first_ids[component] = ids[0]
        wrappers[component] = RowsEmbedding(extended_embedding(base, ids[0], rows[component]), ids[0], rows[component])
        originals[component] = (original_tokenizer, base)
        tokenizers[tokenizer_name] = tokenizer
    new = NewTokens(token, names, first_ids, NewRows(rows), wrappers, originals, layers)
    new.use({name: param for name, param in new.rows.rows.items()})
    for component, wrapper in wrappers.items():
        getattr(pipe, component).set_input_embeddings(wrapper)
    for name, tokenizer in tokenizers.items():
        setattr(pipe, name, tokenizer)
    return new
