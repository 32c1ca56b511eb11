"""Qwen2-VL's and Qwen3-VL's processors for images only, so Qwen-Image-Edit's and Qwen-Image 2.1's text
encoders run where torchvision is missing.

transformers (5.x) builds `Qwen2VLProcessor` / `Qwen3VLProcessor` from an image processor, a tokenizer and a
video processor, and the video processor cannot be built without torchvision; the image pipelines only ever
hand them images. These subclasses take the image processor (the PIL backend when torchvision is missing) and
the tokenizer, and process text and images exactly as their parents do (same placeholder expansion, outputs).

    processor = image_only_processor("Qwen/Qwen-Image-Edit", subfolder="processor")
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2VLProcessor, Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin

# diffusers loads a pipeline component of a module outside its known libraries (a folder saved from a pipeline
# holding these processors names this module) through the base class the module exposes under its own name
__all__ = [
    "ImageOnlyQwen2VLProcessor",
    "ImageOnlyQwen3VLProcessor",
    "ProcessorMixin",
    "image_only_processor",
]


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor (`get_attributes` reads this signature: images + text)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor (Qwen-Image 2.1's) without the video processor."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def image_processor_class() -> Any:
    """Qwen2-VL's torchvision image processor where torchvision imports, else its PIL twin."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil


def image_only_processor(source: str, subfolder: str = "processor", qwen3: bool = False, **kwargs: Any) -> Any:
    """The processor a Qwen-Image-Edit (Qwen-Image 2.1: `qwen3`) checkpoint ships in `subfolder`, read without
    its video processor."""
    from transformers import AutoTokenizer

    image_processor = image_processor_class().from_pretrained(source, subfolder=subfolder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder=subfolder, **kwargs)
    processor = ImageOnlyQwen3VLProcessor if qwen3 else ImageOnlyQwen2VLProcessor
    return processor(image_processor, tokenizer, chat_template=tokenizer.chat_template)
