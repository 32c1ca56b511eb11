"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509, 2511): Qwen-Image's transformer editing a source image.

Facts from diffusers' QwenImageEditPipeline and QwenImageEditPlusPipeline: the transformer, VAE, packing,
timestep / 1000 and objective are Qwen-Image's (qwen_image.py); the source image's latents, normalized like
the target's, are packed in 2x2 patches and appended after the noisy tokens, with an `img_shapes` entry of
their own (the transformer builds their 3D rotary positions; Edit-2511's `zero_cond_t` gives them timestep 0
inside the transformer); only the noisy tokens' prediction is used. Unlike Kontext, the prompt depends on the
source: Qwen2.5-VL reads the instruction *and the picture* through its processor, with an edit system prompt
whose first 64 tokens are dropped. Edit shows the text encoder the picture the VAE encodes; Edit-Plus shows it
"Picture 1: <image>" at a 384 x 384 area (the pipeline's CONDITION_IMAGE_SIZE).
Qwen's processor needs torchvision in transformers 5.x; `load_components` reads it without its video half
(personalize.models.vl_processor) where torchvision is missing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from personalize.models.families import qwen_image
from personalize.models.families.description import Embeds, FamilyDescription, pad_rows

PLUS_CONDITION_AREA = 384 * 384
# planned prompt lengths: an instruction + the picture's image tokens (one per 28 px: 14 px patches merged 2x2)
EDIT_TOKENS = qwen_image.PLANNED_TOKENS + 37 * 37  # a 1024 px source (rounded to 1036 = 37 x 28)
PLUS_TOKENS = qwen_image.PLANNED_TOKENS + 14 * 14  # the 384 x 384 area (rounded to 392 = 14 x 28)


def _pictures(sources: torch.Tensor, pipe: Any, area: int | None) -> list[Any]:
    """(B, 3, H, W) pixels in [0, 1] -> PIL images, resized to `area` (keeping the aspect) when given."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    from PIL import Image

    pictures = []
    for pixels in sources.detach().float().cpu().clamp(0, 1):
        picture = Image.fromarray((pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        if area is not None:
            width, height = calculate_dimensions(area, picture.width / picture.height)
            picture = pipe.image_processor.resize(picture, height, width)
        pictures.append(picture)
    return pictures


def edit_prompt_encoder(area: int | None) -> Any:
    def encode_edit_prompt(pipe: Any, prompts: list[str], sources: torch.Tensor) -> Embeds:
        """Each instruction with its own source picture through the pipeline's encode_prompt, padded to one
        length (the mask marks the real tokens; `trim_padding` cuts the shared padding before the call)."""
        device = next(pipe.text_encoder.parameters()).device
        rows = []
        for prompt, picture in zip(prompts, _pictures(sources, pipe, area)):
            embeds, _ = pipe.encode_prompt([prompt], image=[picture], device=device)  # (1, T, D), no padding
            rows.append(embeds[0])
        padded, mask = pad_rows(rows, max(len(row) for row in rows))
        return {"prompt_embeds": padded, "prompt_embeds_mask": mask}  # (B, T, D), (B, T)

    return encode_edit_prompt


QWEN_IMAGE_EDIT = dataclasses.replace(
    qwen_image.QWEN_IMAGE_FAMILY,
    name="qwen-image-edit",
    pipeline_class="QwenImageEditPipeline",
    tiny_names=("tiny-qwen-image-edit",),
    predict_edit=qwen_image.predict,  # qwen_image.predict appends `reference` tokens with their own img_shapes
    encode_edit_prompt=edit_prompt_encoder(None),
    load_components=qwen_image.processor_components,  # no torchvision needed
    text_tokens=lambda config: EDIT_TOKENS,
    embed_shapes=lambda config: qwen_image.prompt_shapes(config, EDIT_TOKENS),
    defaults_source="diffusers' train_dreambooth_lora_qwen_image.py defaults (rank 4, lr 1e-4, attention "
    "to_q/to_k/to_v/to_out.0, uniform timesteps); the edit inputs as QwenImageEditPipeline feeds them",
    published={"Qwen/Qwen-Image-Edit": qwen_image.QWEN_IMAGE},
)

QWEN_IMAGE_EDIT_PLUS = dataclasses.replace(
    QWEN_IMAGE_EDIT,
    name="qwen-image-edit-plus",
    pipeline_class="QwenImageEditPlusPipeline",
    tiny_names=("tiny-qwen-image-edit-plus",),
    encode_edit_prompt=edit_prompt_encoder(PLUS_CONDITION_AREA),
    text_tokens=lambda config: PLUS_TOKENS,
    embed_shapes=lambda config: qwen_image.prompt_shapes(config, PLUS_TOKENS),
    defaults_source="diffusers' train_dreambooth_lora_qwen_image.py defaults (rank 4, lr 1e-4, attention "
    "to_q/to_k/to_v/to_out.0, uniform timesteps); the edit inputs as QwenImageEditPlusPipeline feeds them",
    published={
        "Qwen/Qwen-Image-Edit-2509": qwen_image.QWEN_IMAGE,
        "Qwen/Qwen-Image-Edit-2511": {**qwen_image.QWEN_IMAGE, "zero_cond_t": True},
    },
)

__all__ = ["QWEN_IMAGE_EDIT", "QWEN_IMAGE_EDIT_PLUS", "FamilyDescription"]
