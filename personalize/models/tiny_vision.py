"""A tiny CLIP image encoder (CLIPVisionModelWithProjection) built in code, for IP-Adapter tests and demos.

Sizes follow diffusers' own IP-Adapter tests (hidden 32, 5 layers, 4 heads, projection 32, 32 px
images); patches of 4 px keep it fast. Seeded: the same weights on every call.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_IMAGE_SIZE = 32


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPVisionModelWithProjection(config)
    return model.eval()
