"""The frozen image (and text) encoders a few-shot classifier is built on: CLIP or ViT, tiny or from the Hub."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from personalize.errors import UserError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIT_MEAN, VIT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class Backbone:
    kind: str  # "clip" | "vit"
    model: nn.Module  # CLIPModel | ViTModel
    tokenizer: Any
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def vision(self) -> nn.Module:
        """The image encoder whose layers VPT and the core's adapters change."""
        return self.model.vision_model if self.kind == "clip" else self.model

    def layers(self) -> nn.ModuleList:
        vision = self.vision
        return vision.encoder.layers if self.kind == "clip" else vision.layers

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP: the projected image embedding (B, d); ViT: the final CLS state (B, D)."""
        if self.kind == "clip":
            return self.model.get_image_features(pixel_values=pixels).pooler_output
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=ids).pooler_output  # (C, d)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp()) if self.kind == "clip" else 1.0


def load_backbone(name: str) -> Backbone:
    from personalize.models.tiny_vision import TINY_IMAGE_SIZE, TINY_VISION

    if name == "tiny-clip":
        model, tokenizer = TINY_VISION[name]()
        return _frozen(Backbone("clip", model, tokenizer, TINY_IMAGE_SIZE, CLIP_MEAN, CLIP_STD))
    if name == "tiny-vit":
        return _frozen(Backbone("vit", TINY_VISION[name](), None, TINY_IMAGE_SIZE, VIT_MEAN, VIT_STD))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load model '{name}' ({str(error).splitlines()[0]}); pass tiny-clip, tiny-vit, "
            "a CLIP/ViT hub id or a local folder"
        ) from None
    if config.model_type == "clip":
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(name)
        size = config.vision_config.image_size
        return _frozen(Backbone("clip", model, AutoTokenizer.from_pretrained(name), size, CLIP_MEAN, CLIP_STD))
    if config.model_type == "vit":
        from transformers import ViTModel

        model = ViTModel.from_pretrained(name, add_pooling_layer=False)
        return _frozen(Backbone("vit", model, None, config.image_size, VIT_MEAN, VIT_STD))
    raise UserError(f"'{name}' is a {config.model_type} model; --task classify takes CLIP or ViT models")


def _frozen(backbone: Backbone) -> Backbone:
    backbone.model.eval().requires_grad_(False)
    return backbone
