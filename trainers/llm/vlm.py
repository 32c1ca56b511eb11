"""VLM instruction tuning (LLaVA architecture): conversations about images -> labelled examples.

Each JSONL line holds "image"/"images" (paths relative to the file) and a conversation; a user turn
names where an image goes with "<image>" (added before the first user message when missing). Images
are decoded with the robust loader of `personalize.data` (EXIF orientation, alpha, 16-bit, ...) and
an unreadable one drops its conversation, reported by line number. Each "<image>" is expanded to
the number of image tokens the processor uses, so the labels line up with the model's sequence:
image and user tokens are -100, assistant tokens are trained.

Adapters go on the language model by default (`targets: language`); `train_projector` and
`train_vision_tower` widen that. The recipe itself is `personalize.trainers.llm.sft.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from personalize.errors import UserError
from personalize.trainers.llm.chat_data import ChatReport, Conversation, Example, collate, tokenize

IMAGE = "<image>"


def vlm_targets(train_projector: bool, train_vision_tower: bool) -> str:
    if train_vision_tower:
        return "all"
    return "language+projector" if train_projector else "language"


def image_token_count(processor: Any) -> int:
    """How many tokens one "<image>" becomes (patches, minus the CLS token with the default strategy)."""
    from PIL import Image

    size = processor.image_processor.crop_size
    probe = Image.new("RGB", (size["width"], size["height"]))
    ids = processor(text=IMAGE, images=[probe], return_tensors="pt")["input_ids"][0]
    return int((ids == processor.tokenizer.convert_tokens_to_ids(IMAGE)).sum())


def _with_images(conversation: Conversation, count: int) -> list[dict[str, str]]:
    messages = [dict(message) for message in conversation.messages]
    placed = sum(message["content"].count(IMAGE) for message in messages)
    if placed != len(conversation.images):
        if placed:
            raise ValueError(f"{placed} '<image>' marks for {len(conversation.images)} images")
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user]["content"] = IMAGE * len(conversation.images) + "\n" + messages[first_user]["content"]
    for message in messages:
        message["content"] = message["content"].replace(IMAGE, IMAGE * count)
    return messages


def _decode(paths: Sequence[str]) -> list[Any]:
    from personalize.data.decode import BadImage, decode, read_bytes

    images = []
    for path in paths:
        try:
            images.append(decode(read_bytes(Path(path))).image)
        except BadImage as error:
            raise BadImage(f"image {Path(path).name}: {error}") from None
    return images


def build_examples(
    processor: Any, conversations: Sequence[Conversation], max_length: int, report: ChatReport
) -> list[Example]:
    """Tokenized, labelled examples with their pixel values in `Example.pixels`."""
    from personalize.data.decode import BadImage

    count = image_token_count(processor)
    kept, pixels = [], []
    for conversation in conversations:
        try:
            if not conversation.images:
                raise ValueError("no image (a VLM conversation needs 'image' or 'images')")
            images = _decode(conversation.images)
            messages = _with_images(conversation, count)
        except (BadImage, ValueError) as error:
            report.skipped.append(f"line {conversation.line}: {error}")
            continue
        kept.append(Conversation(messages, conversation.images, conversation.line))
        pixels.append(processor.image_processor(images, return_tensors="pt")["pixel_values"])  # (n, 3, H, W)
    if not kept:
        raise UserError(f"no usable conversation with a readable image ({'; '.join(report.skipped[:3])})")
    examples = tokenize(processor.tokenizer, kept, max_length, report)
    by_images = {tuple(c.images): p for c, p in zip(kept, pixels)}
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    for example in examples:
        if sum(t == image_id for t in example.input_ids) != count * len(example.images):
            raise UserError(
                f"--max-length {max_length} cuts through an image's tokens ({count} per image); raise --max-length"
            )
        example.pixels = by_images[tuple(example.images)]
    return examples


def collate_vlm(rows: Sequence[Sequence[Example]], pad_token_id: int) -> dict[str, torch.Tensor]:
    batch = collate(rows, pad_token_id)
    batch["pixel_values"] = torch.cat([example.pixels for row in rows for example in row])  # (N, 3, H, W)
    return batch
