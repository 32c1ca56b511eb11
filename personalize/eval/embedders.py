"""The metric models: DINO (ViT CLS token) and CLIP (image and text embeddings), loaded by hub id.

    dino = load_embedder("dino", "facebook/dino-vits16"); dino.images(pil_images)     # (N, 384)
    clip = load_embedder("clip", "openai/clip-vit-base-patch32"); clip.texts(prompts)  # (N, 512)

`tiny-dino` and `tiny-clip` name random-weight models built in code (personalize.models.tiny_vision):
what the tests and offline runs on tiny bases use; their figures check the plumbing, not quality.
Images go through the model's own image processor when it has one (hub models), else a plain
resize + center crop + normalize to the model's input size (the tiny models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from personalize.errors import UserError

DEFAULT_MODELS = {"dino": "facebook/dino-vits16", "clip": "openai/clip-vit-base-patch32"}
TINY_MODELS = {"dino": "tiny-dino", "clip": "tiny-clip"}
# Normalization of the fallback preprocessing: ImageNet's (DINO) and OpenAI CLIP's.
MEAN_STD = {
    "dino": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def to_pixels(images: list[Any], size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL images -> (N, 3, size, size): shorter side resized to `size` (bicubic), center crop, normalized."""
    from PIL import Image

    batch = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        batch.append(np.asarray(image, dtype=np.float32) / 255.0)  # (size, size, 3)
    pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)  # (N, 3, size, size)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@dataclass
class Embedder:
    kind: str  # "dino" or "clip"
    source: str
    model: Any
    processor: Any = None  # the model's image processor, when it has one
    tokenizer: Any = None  # CLIP only
    device: str = "cpu"

    def _pixels(self, images: list[Any]) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
        config = getattr(self.model.config, "vision_config", self.model.config)
        mean, std = MEAN_STD[self.kind]
        return to_pixels(images, config.image_size, mean, std)

    @torch.no_grad()
    def images(self, images: list[Any], batch_size: int = 16) -> torch.Tensor:
        """(N, D) image embeddings: DINO's CLS token, or CLIP's projected image embedding."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self._pixels(images[start : start + batch_size]).to(self.device)
            if self.kind == "dino":
                out.append(self.model(pixel_values=pixels).last_hidden_state[:, 0])  # (B, D) CLS
            else:
                pooled = self.model.vision_model(pixel_values=pixels).pooler_output
                out.append(self.model.visual_projection(pooled))  # (B, D)
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        """(N, D) CLIP text embeddings of prompts."""
        if self.kind != "clip":
            raise ValueError("only a CLIP embedder embeds text")
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return self.model.text_projection(pooled).float().cpu()


def load_embedder(kind: str, source: str | None = None, device: str = "cpu") -> Embedder:
    """A DINO or CLIP embedder from a hub id, a local folder, or tiny-dino / tiny-clip."""
    if kind not in DEFAULT_MODELS:
        raise UserError(f"unknown metric model kind '{kind}'; use dino=ID or clip=ID")
    source = source or DEFAULT_MODELS[kind]
    if source in TINY_MODELS.values():
        from personalize.models import tiny_vision

        if source != TINY_MODELS[kind]:
            raise UserError(f"{source} is not a {kind} model; use {kind}={TINY_MODELS[kind]}")
        if kind == "dino":
            return Embedder(kind, source, tiny_vision.tiny_dino().to(device), device=device)
        model, tokenizer = tiny_vision.tiny_clip()
        return Embedder(kind, source, model.to(device), tokenizer=tokenizer, device=device)
    try:
        if kind == "dino":
            from transformers import AutoModel

            model = AutoModel.from_pretrained(source, add_pooling_layer=False)
            tokenizer = None
        else:
            from transformers import AutoTokenizer, CLIPModel

            model = CLIPModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot load the {kind} metric model '{source}' ({first}); pass --metric-model {kind}=PATH "
            f"(a local copy) or {kind}={TINY_MODELS[kind]} (random weights, offline)"
        ) from None
    return Embedder(kind, source, model.eval().to(device), _image_processor(source), tokenizer, device)


def _image_processor(source: str) -> Any:
    """The model's own image processor, or None when it ships none (then to_pixels is used)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None


def parse_metric_models(specs: list[str]) -> dict[str, str]:
    """["dino=ID", "clip=PATH"] -> {"dino": "ID", "clip": "PATH"}; one line on a malformed entry."""
    chosen: dict[str, str] = {}
    for spec in specs:
        kind, equals, source = spec.partition("=")
        if not equals or kind not in DEFAULT_MODELS or not source:
            raise UserError(
                f"--metric-model {spec}: expected dino=ID or clip=ID (a hub id, folder, or tiny-dino/tiny-clip)"
            )
        chosen[kind] = source
    return chosen
