"""A tiny CLIP image encoder (CLIPVisionModelWithProjection) built in code, for IP-Adapter tests and demos.

Sizes follow diffusers' own IP-Adapter tests (hidden 32, 5 layers, 4 heads, projection 32, 32 px
images); patches of 4 px keep it fast. Seeded: the same weights on every call.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_IMAGE_SIZE = 32


def _seeded(build: Any) -> Any:
    """The module `build()` makes under seed 0 (the caller's RNG untouched), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    return model.eval()


def _tiny_vit(layers: int, patch: int) -> Any:
    """ViTModel without pooler: hidden 32, 4 heads, 32 px images in `patch` px patches."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=patch,
    )
    return _seeded(lambda: ViTModel(config, add_pooling_layer=False))


def tiny_clip_vision(projection_dim: int = 32) -> Any:
    """CLIPVisionModelWithProjection with random (seed 0) weights, in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=projection_dim,
        num_hidden_layers=5,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=4,
    )
    return _seeded(lambda: CLIPVisionModelWithProjection(config))


def tiny_dino() -> Any:
    """A ViT-S/16-style DINO backbone at toy size (ViTModel, no pooler), random (seed 0) weights, eval mode."""
    return _tiny_vit(layers=2, patch=8)


def tiny_clip(projection_dim: int = 16) -> tuple[Any, Any]:
    """(CLIPModel, tokenizer): text and image towers at toy size, random (seed 0) weights, eval mode."""
    from transformers import CLIPConfig, CLIPModel

    from personalize.models.tiny_diffusion import _clip_text_config
    from personalize.models.tiny_tokenizers import tiny_clip_tokenizer

    text = _clip_text_config().to_dict()
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vision.update(image_size=TINY_IMAGE_SIZE, patch_size=8)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    return _seeded(lambda: CLIPModel(config)), tiny_clip_tokenizer()


def tiny_vit() -> Any:
    """A ViTModel (no pooler, seed 0) for few-shot classification: 32 px images in 4 px patches, hidden 32,
    5 layers, 4 heads."""
    return _tiny_vit(layers=5, patch=4)


TINY_VISION = {"tiny-clip": tiny_clip, "tiny-vit": tiny_vit}  # `--task classify --model tiny-clip | tiny-vit`
