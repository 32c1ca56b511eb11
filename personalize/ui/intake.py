"""The Train tab's view of a photo folder, exactly as training will see it (personalize.data's scan).

`intake_view` lists every file with its verdict (used with its bucket and caption, or skipped with the
intake's reason) and renders each used image's training crop; `save_captions` writes edited captions as
the sidecar .txt files the intake reads (data.caption_extension), next to the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.errors import UserError


@dataclass
class IntakeRow:
    file: str
    status: str  # used | skipped
    detail: str  # the bucket ("64x64 bucket") or the reason it was skipped
    caption: str


def data_config(images: Path, token: str, class_word: str, resolution: int) -> Any:
    from personalize.data import DataConfig

    return DataConfig(images=str(images), token=token or "sks", class_word=class_word, resolution=resolution)


def intake_view(images: Path, token: str, class_word: str, resolution: int) -> tuple[list[IntakeRow], list[Any]]:
    """(one row per file, [(crop image, label)] for the used ones) as training would take them."""
    from personalize.data.dataset import ImageDataset, scan
    from personalize.data.decode import BadImage, decode, read_bytes

    if not images.is_dir():
        raise UserError(f"{images} is not a folder of photos; upload photos or pick a folder")
    config = data_config(images, token, class_word, resolution)
    records, report = scan(config)
    rows = [
        IntakeRow(record.path.name, "used", f"{record.bucket[1]}x{record.bucket[0]} bucket", record.prompt)
        for record in records
    ]
    rows += [IntakeRow(path.name, "skipped", reason, "") for path, reason in report.skipped]
    dataset = ImageDataset(records, report, config)
    crops = []
    for index, record in enumerate(records):
        plan = dataset.plan(index, epoch=0, flip=False)  # the center crop of epoch 0
        try:
            decoded = decode(read_bytes(record.path), dataset.background, draft=plan.resized)
        except BadImage:
            continue  # changed on disk since the scan; the next refresh reports it
        from personalize.data.transforms import apply_plan

        crops.append((apply_plan(decoded.image, plan), f"{record.path.name}: {record.bucket[1]}x{record.bucket[0]}"))
    return rows, crops


def save_captions(images: Path, captions: dict[str, str], extension: str = ".txt") -> int:
    """Write each caption as IMAGE.txt beside its image (an empty caption removes the sidecar)."""
    written = 0
    for name, caption in captions.items():
        image = images / Path(name).name  # names come from the table: never a path
        if not image.is_file():
            continue
        sidecar = image.with_suffix(extension)
        text = " ".join(str(caption).split())
        if text:
            sidecar.write_text(text + "\n", encoding="utf-8")
            written += 1
        elif sidecar.is_file():
            sidecar.unlink()
    return written
