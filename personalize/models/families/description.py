"""What a flow-matching DiT family is, in one value: the recipe, caches, planner, formats and loaders read it.

A family file (flux.py, sd3.py, ...) builds one `FamilyDescription`; nothing outside the family files
branches on a family's name. What differs per family:

- classes: the diffusers pipeline and transformer (`pipeline_class`, `transformer_class`), and which
  pipeline attributes are text encoders;
- `matches(config)`: is this transformer config one of ours (read from the config, never from a name);
- `encode_prompt(pipe, prompts)`: the embeddings the transformer takes, as a dict of batched tensors
  (what the text cache stores);
- `predict(transformer, noisy, timesteps, embeds, guidance)`: one transformer call on unpacked latents
  (B, C, h, w) with timesteps in [0, 1000]; the family packs latents, builds position ids, scales the
  timestep and passes guidance as its transformer expects, and returns the prediction as (B, C, h, w);
- `latent_multiple(config)`: latent height/width must divide by it (packing / patch size);
  `latent_channels(config)`: the VAE latent channels the transformer takes;
- objective defaults from the family's reference training script: `weighting_scheme`,
  `precondition_outputs`, `guidance_scale` (None: no guidance input);
- `full_precision`: layers `--quantize` leaves unquantized (regexes); `tiny_names`: its offline models;
- `targets`: adapter target presets (regexes on diffusers module paths) and the default preset;
- LoRA key names: the diffusers component prefix and the single-file (ComfyUI) prefix;
- `defaults`: rank / lr / steps with their source; `distilled(config)`: the caveat of a distilled model;
- `published`: transformer configs of the released checkpoints, by hub id, for the planner (no download);
- `embed_shapes(config)`: the per-sample shape of each embedding `encode_prompt` returns (the planner's
  stand-ins); `native_resolution`: the training side when the model's config names none;
- `clip`: (frames, fps) for video families, whose latents carry a frame axis (B, C, F, h, w) and whose data
  are clips (`data.frames` / `data.fps` default to it); None for image families (B, C, h, w).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Embeds = dict[str, torch.Tensor]


def pooled_and_sequence(config: Mapping[str, Any], text_tokens: int) -> dict[str, tuple[int, ...]]:
    """The SD3 / Flux embeddings: a (tokens, joint_attention_dim) sequence and a pooled vector."""
    return {
        "prompt_embeds": (text_tokens, int(config["joint_attention_dim"])),
        "pooled_prompt_embeds": (int(config["pooled_projection_dim"]),),
    }


@dataclass(frozen=True)
class FamilyDescription:
    name: str
    pipeline_class: str
    transformer_class: str
    text_encoders: tuple[str, ...]
    trainable_text_encoders: tuple[str, ...]  # --train-text-encoder adapts these (the CLIP ones, as the reference)
    matches: Callable[[Mapping[str, Any]], bool]
    encode_prompt: Callable[[Any, list[str]], Embeds]
    predict: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Embeds, float | None], torch.Tensor]
    latent_multiple: Callable[[Mapping[str, Any]], int]
    latent_channels: Callable[[Mapping[str, Any]], int]  # VAE latent channels, from the transformer config
    weighting_scheme: str
    precondition_outputs: bool
    guidance_scale: float | None
    targets: dict[str, list[str]]
    default_targets: str
    defaults: dict[str, tuple[int | None, float, int]]  # method -> (rank, lr, steps); others: the recipe's
    defaults_source: str
    distilled: Callable[[Mapping[str, Any]], str | None] = lambda config: None
    full_precision: tuple[str, ...] = (r"(x_embedder|context_embedder|proj_out|norm_out\.linear)",)  # --quantize skips
    tiny_names: tuple[str, ...] = ()  # offline tiny builders of this family (personalize.models.tiny)
    lora_prefix: str = "transformer"  # diffusers' <Family>LoraLoaderMixin
    single_file_prefix: str = "lora_transformer"  # what ComfyUI maps onto the transformer (see README)
    published: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_tokens: Callable[[Mapping[str, Any]], int] = lambda config: 77
    image_tokens: Callable[[Mapping[str, Any], int, int], int] = lambda config, h, w: h * w  # per latent frame
    embed_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]] | None = None  # None: pooled + sequence
    clip: tuple[int, float] | None = None  # video families: default (frames, fps) of a training clip
    native_resolution: int | None = None

    def embedding_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the embeddings the transformer takes (without the batch dimension)."""
        if self.embed_shapes is not None:
            return self.embed_shapes(config)
        return pooled_and_sequence(config, self.text_tokens(config))

    def method_defaults(self, method: str) -> tuple[int | None, float, int] | None:
        return self.defaults.get(method)
