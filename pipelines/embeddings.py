"""Textual Inversion embeddings: new tokens in a pipeline's tokenizer(s), new rows in its text encoder(s).

A token with n vectors becomes n tokens "<tok>", "<tok>_1", ..., "<tok>_{n-1}" (the names diffusers'
`maybe_convert_prompt` expands a prompt's "<tok>" into). The pipeline's original tokenizer and
embedding module are never modified: the first load keeps them aside and installs a copy of the
tokenizer with the tokens added and a new `nn.Embedding` (original rows, then the learned ones);
every later load or unload rebuilds that copy from the originals, and the last unload puts the
original objects back, so the text encoder is bit-identical to the base again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from personalize.errors import UserError
from personalize.pipelines.components import TEXT_ENCODERS, tokenizer_name

PerEncoder = dict[str, dict[str, torch.Tensor]]  # {"text_encoder": {token: (n, d)}, ...}
BASES_ATTRIBUTE = "_personalize_embedding_bases"


@dataclass
class EncoderBase:
    """A text encoder's tokenizer and input embedding as they were before any token was added."""

    tokenizer: Any
    embedding: nn.Embedding
    vocab_size: int | None


def token_names(token: str, count: int) -> list[str]:
    """The tokenizer entries of a `count`-vector embedding: ["<t>", "<t>_1", ..., "<t>_{count-1}"]."""
    return [token] + [f"{token}_{index}" for index in range(1, count)]


def _input_embedding(encoder: nn.Module, component: str) -> nn.Embedding:
    embedding = encoder.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise UserError(
            f"{component}'s token embedding is a {type(embedding).__name__} (an adapter on it?); remove that "
            "adapter before loading Textual Inversion embeddings"
        )
    return embedding


def _original(pipe: Any, component: str) -> tuple[Any, nn.Embedding]:
    """The tokenizer and embedding this component had before any embedding of ours."""
    bases: dict[str, EncoderBase] = getattr(pipe, BASES_ATTRIBUTE, {})
    if component in bases:
        return bases[component].tokenizer, bases[component].embedding
    return getattr(pipe, tokenizer_name(component)), _input_embedding(getattr(pipe, component), component)


def check(pipe: Any, embeddings: dict[str, dict[str, torch.Tensor]], taken: set[str]) -> PerEncoder:
    """{token: {component: vectors}} -> {component: {token: (n, d)}}, after checking that every component
    exists with a tokenizer, every vector has the encoder's width, and no token name is already in use."""
    per_encoder: PerEncoder = {}
    for token, vectors_by_component in embeddings.items():
        for component, vectors in vectors_by_component.items():
            if component not in TEXT_ENCODERS or not isinstance(getattr(pipe, component, None), nn.Module):
                raise UserError(
                    f"embedding '{token}' is for {component}, which this {type(pipe).__name__} does not have; "
                    "is the embedding for another model family?"
                )
            if getattr(pipe, tokenizer_name(component), None) is None:
                raise UserError(f"{type(pipe).__name__} has no {tokenizer_name(component)} for embedding '{token}'")
            tokenizer, embedding = _original(pipe, component)
            vectors = vectors.reshape(1, -1) if vectors.dim() == 1 else vectors  # (n, d)
            if vectors.dim() != 2 or vectors.shape[1] != embedding.embedding_dim:
                raise UserError(
                    f"embedding '{token}' for {component} has shape {tuple(vectors.shape)}, but that text encoder "
                    f"takes vectors of width {embedding.embedding_dim}; is it for another model family?"
                )
            vocabulary = tokenizer.get_vocab()
            for name in token_names(token, vectors.shape[0]):
                if name in vocabulary or (component, name) in taken:
                    raise UserError(
                        f"token '{name}' is already in {tokenizer_name(component)}; unload the adapter that "
                        "added it, or rename the token"
                    )
            per_encoder.setdefault(component, {})[token] = vectors
    return per_encoder


def taken_tokens(loaded: list[PerEncoder]) -> set[tuple[str, str]]:
    """(component, tokenizer entry) pairs that loaded adapters already use."""
    return {
        (component, name)
        for per_encoder in loaded
        for component, tokens in per_encoder.items()
        for token, vectors in tokens.items()
        for name in token_names(token, vectors.shape[0])
    }


def _extended(base: EncoderBase, tokens: list[tuple[str, torch.Tensor]]) -> tuple[Any, nn.Embedding]:
    """A copy of the base tokenizer with `tokens` added, and an embedding with their vectors at their ids."""
    tokenizer = copy.deepcopy(base.tokenizer)
    names = [name for token, vectors in tokens for name in token_names(token, vectors.shape[0])]
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    old = base.embedding.weight  # (V, d)
    rows = max(old.shape[0], max(ids) + 1)
    embedding = nn.Embedding(
        rows, old.shape[1], padding_idx=base.embedding.padding_idx, device=old.device, dtype=old.dtype
    )
    embedding.requires_grad_(base.embedding.weight.requires_grad)
    with torch.no_grad():
        embedding.weight[: old.shape[0]] = old
        vectors = torch.cat([vectors for _, vectors in tokens]).to(old.device, old.dtype)  # (sum n, d)
        embedding.weight[torch.tensor(ids, device=old.device)] = vectors
    return tokenizer, embedding


def _install(pipe: Any, component: str, tokenizer: Any, embedding: nn.Embedding, vocab_size: int | None) -> None:
    encoder = getattr(pipe, component)
    encoder.set_input_embeddings(embedding)
    if vocab_size is not None:
        encoder.config.vocab_size = vocab_size
    setattr(pipe, tokenizer_name(component), tokenizer)


def rebuild(pipe: Any, loaded: list[PerEncoder]) -> None:
    """Make the tokenizers and text encoder embeddings hold exactly the tokens of `loaded` (in order)."""
    bases: dict[str, EncoderBase] = pipe.__dict__.setdefault(BASES_ATTRIBUTE, {})
    components = set(bases) | {component for per_encoder in loaded for component in per_encoder}
    for component in sorted(components):
        tokens = [pair for per_encoder in loaded for pair in per_encoder.get(component, {}).items()]
        if component not in bases:
            encoder = getattr(pipe, component)
            bases[component] = EncoderBase(
                getattr(pipe, tokenizer_name(component)),
                _input_embedding(encoder, component),
                getattr(encoder.config, "vocab_size", None),
            )
        base = bases[component]
        if not tokens:
            _install(pipe, component, base.tokenizer, base.embedding, base.vocab_size)
            del bases[component]
            continue
        tokenizer, embedding = _extended(base, tokens)
        _install(pipe, component, tokenizer, embedding, embedding.num_embeddings)
