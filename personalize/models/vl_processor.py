"""Qwen2-VL's processor for images only, so Qwen-Image-Edit's text encoder runs where torchvision is missing.

transformers (5.x) builds `Qwen2VLProcessor` from an image processor, a tokenizer and a video processor, and
its video processor cannot be built without torchvision; the edit pipelines only ever hand it images. This
subclass takes the image processor (the PIL backend when torchvision is missing) and the tokenizer, and
processes text and images exactly as Qwen2VLProcessor does (same placeholder expansion, same outputs).

    processor = image_only_processor("Qwen/Qwen-Image-Edit", subfolder="processor")
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (`get_attributes` reads the signature: images + text)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def image_processor_class() -> Any:
    """Qwen2-VL's torchvision image processor where torchvision imports, else its PIL twin."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def image_only_processor(source: str, subfolder: str = "processor", **kwargs: Any) -> ImageOnlyQwen2VLProcessor:
    """The processor a Qwen-Image-Edit checkpoint ships in `subfolder`, read without its video processor."""
    from transformers import AutoTokenizer

    image_processor = image_processor_class().from_pretrained(source, subfolder=subfolder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder=subfolder, **kwargs)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)
