"""What a flow-matching DiT family is, in one value: the recipe, caches, planner, formats and loaders read it.

A family file (flux.py, sd3.py, ...) builds one `FamilyDescription`; nothing outside the family files
branches on a family's name. What differs per family:

- classes: the diffusers pipeline and transformer (`pipeline_class`, `transformer_class`), and which
  pipeline attributes are text encoders;
- `matches(config)`: is this transformer config one of ours (read from the config, never from a name);
- `encode_prompt(pipe, prompts)`: the embeddings the transformer takes, as a dict of batched tensors
  (what the text cache stores), under the keys `embed_keys` (e.g. Chroma's text attention mask);
- `predict(transformer, noisy, timesteps, embeds, guidance)`: one transformer call on unpacked latents
  (B, C, h, w) with timesteps in [0, 1000]; the family packs latents, builds position ids, scales the
  timestep and passes guidance as its transformer expects, and returns the prediction as (B, C, h, w);
- `latent_multiple(config)`: latent height/width must divide by it (packing / patch size);
  `latent_channels(config)`: the VAE latent channels the transformer takes;
- objective defaults from the family's reference training script: `weighting_scheme`,
  `precondition_outputs`, `guidance_scale` (None: no guidance input);
- `full_precision`: layers `--quantize` leaves unquantized (regexes); `tiny_names`: its offline models;
- `targets`: adapter target presets (regexes on diffusers module paths) and the default preset;
- LoRA key names: the diffusers component prefix, the single-file (ComfyUI) prefix and the layers it
  renames to the model's original names;
- `defaults`: rank / lr / steps with their source; `distilled(config)`: the caveat of a distilled model;
- `published`: transformer configs of the released checkpoints, by hub id, for the planner (no download);
- `embed_keys`: the tensors `encode_prompt` returns (what the text cache stores and `predict` reads) and
  `embed_shapes(config)`: their per-sample shapes (the planner builds them on the meta device); a family
  whose prompts have variable length returns them padded with a `prompt_embeds_mask` (see `trim_padding`);
- `block_pattern`: module paths of the transformer's repeated blocks (the planner's checkpointing estimate);
  `encoder_parameters`: parameters of the released text encoders + VAE (the planner's caching phase);
- `trained_latents(config, h, w)`: the (C, h', w') shape of what the recipe trains on for VAE latents of
  h x w (personalize.models.encode.encode_images' output; None: (latent_channels, h, w); Flux.2's VAE
  hands out 2x2 patches, (4C, h/2, w/2));
- `clip`: (frames, fps) for video families, whose latents carry a frame axis (B, C, F, h, w) and whose data
  are clips (`data.frames` / `data.fps` default to it); None for image families (B, C, h, w);
  `native_resolution`: the training side when the model's config names none; `vae_stages`: spatial halvings
  of the released VAE (the planner's latent size for a hub id it cannot read). The planner traces `predict`
  on the meta device with masks (`*_mask` keys) and image slots (`*_slots`) given real values.

Edit models (`personalize train --task edit`) add one hook:

- `predict_edit(transformer, noisy, timesteps, embeds, guidance, reference)`: `predict` with the source
  image's latents `reference` (B, C, h', w') as extra tokens the way the family's reference script feeds
  them (their own position ids); returns the prediction for the noisy tokens only, (B, C, h, w).
  None: the family has no edit input (`--task edit` names the families that do).
- `encode_edit_prompt(pipe, prompts, sources)`: for families whose text encoder also reads the source picture
  (Qwen-Image-Edit): the embeddings of each instruction with its source pixels (B, 3, H, W) in [0, 1]; the
  recipe then encodes each (source crop, instruction) once, keeping the text encoder, instead of caching
  prompts alone. None: `encode_prompt` serves edits too (Kontext, Flux.2).

Loading: `load_components(source, **kwargs)` gives pipeline components to pass to `from_pretrained` for a
folder or hub id of this family (a component transformers cannot build on this machine, built another way).

Families that share a transformer class (Flux.1 and Flux Kontext) are told apart by their pipeline class
(`pipeline_class`, then `model_index.json`'s `_class_name`), before the transformer class or the config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Embeds = dict[str, torch.Tensor]
Predict = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Embeds, "float | None"], torch.Tensor]
PredictEdit = Callable[
    [torch.nn.Module, torch.Tensor, torch.Tensor, Embeds, "float | None", torch.Tensor], torch.Tensor
]


@dataclass(frozen=True)
class FamilyDescription:
    name: str
    pipeline_class: str
    transformer_class: str
    text_encoders: tuple[str, ...]
    trainable_text_encoders: tuple[str, ...]  # --train-text-encoder adapts these (the CLIP ones, as the reference)
    matches: Callable[[Mapping[str, Any]], bool]
    encode_prompt: Callable[[Any, list[str]], Embeds]
    predict: Predict
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
    # layers ComfyUI maps by their original names only, written lora_unet_<original>: (diffusers template,
    # original template) pairs, {} a block index (personalize/formats/original_names.py)
    single_file_renames: tuple[tuple[str, str], ...] = ()
    published: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_tokens: Callable[[Mapping[str, Any]], int] = lambda config: 77
    image_tokens: Callable[[Mapping[str, Any], int, int], int] = lambda config, h, w: h * w  # per latent frame
    embed_keys: tuple[str, ...] = ("prompt_embeds", "pooled_prompt_embeds")
    embed_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]] | None = None
    block_pattern: str = r"(single_)?transformer_blocks\.\d+"
    encoder_parameters: float = 0.0
    clip: tuple[int, float] | None = None  # video families: default (frames, fps) of a training clip
    native_resolution: int | None = None
    trained_latents: Callable[[Mapping[str, Any], int, int], tuple[int, int, int]] | None = None
    vae_stages: int = 3  # spatial halvings of the released VAE (8x; Qwen-Image 2.1: 4, 16x), for planning by hub id

    def latent_shape(self, config: Mapping[str, Any], h: int, w: int) -> tuple[int, int, int]:
        """(C, h', w') of the latents the recipe trains on, for VAE latents of h x w."""
        if self.trained_latents is not None:
            return self.trained_latents(config, h, w)
        return self.latent_channels(config), h, w

    def example_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of what `encode_prompt` returns for a transformer of this config."""
        if self.embed_shapes is not None:
            return self.embed_shapes(config)
        return {
            "prompt_embeds": (self.text_tokens(config), int(config["joint_attention_dim"])),
            "pooled_prompt_embeds": (int(config["pooled_projection_dim"]),),
        }

    predict_edit: PredictEdit | None = None  # edit models: the source latents as extra tokens (see above)
    encode_edit_prompt: Callable[[Any, list[str], torch.Tensor], Embeds] | None = None  # prompts that see the source
    load_components: Callable[..., dict[str, Any]] | None = None

    def method_defaults(self, method: str) -> tuple[int | None, float, int] | None:
        return self.defaults.get(method)


def pad_rows(rows: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length prompt embeddings [(T_i, ...)] -> (B, length, ...) zero-padded and their (B, length) mask
    (1 for real tokens): a fixed length lets the text cache batch any prompts together."""
    padded = rows[0].new_zeros(len(rows), length, *rows[0].shape[1:])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for index, row in enumerate(rows):
        padded[index, : min(len(row), length)] = row[:length]
        mask[index, : min(len(row), length)] = 1
    return padded, mask


def trim_padding(embeds: Embeds) -> Embeds:
    """Cut the padding every row of the batch shares (the pipelines pad only to the batch's longest prompt,
    so the transformer sees the same tokens as at inference). On the meta device (the planner) the padded
    length stays: an upper bound."""
    mask = embeds.get("prompt_embeds_mask")
    if mask is None or mask.is_meta:
        return embeds
    longest = max(int(mask.sum(dim=1).max()), 1)
    return {
        key: value[:, :longest] if value.dim() >= 2 and key.startswith("prompt_embeds") else value
        for key, value in embeds.items()
    }


def stack_rows(rows: list[Embeds]) -> Embeds:
    """Embeddings of one prompt each, of different lengths -> one batch: the `prompt_embeds*` tensors
    zero-padded after the longest row's tokens (mask 0 there, `pad_rows`), the rest stacked as they are."""
    longest = max(row["prompt_embeds"].shape[1] for row in rows)
    return {
        key: pad_rows([row[key][0] for row in rows], longest)[0]
        if key.startswith("prompt_embeds") and rows[0][key].dim() >= 2
        else torch.cat([row[key] for row in rows])
        for key in rows[0]
    }
