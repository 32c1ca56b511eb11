"""Edit-task data: (source, target, instruction) triples for `personalize train --task edit`.

The targets are the usual training images (`--images`, with their buckets, crops, flips and caches);
each has a source image of the same file stem in `--control` (paired by `paired.match_by_name`, which
names every unpaired file in one error), transformed with the target's plan so the pair stays aligned,
as the reference scripts apply one geometry to both. The instruction of a pair comes from `--captions`
(a text file of `name: instruction` lines, `name` a target's file name or stem), else from the target's
caption sidecar or the instance prompt, as any training prompt does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.config import option
from personalize.data.paired import PairedDataset, match_by_name
from personalize.data.sources import fill_trigger
from personalize.errors import UserError

SOURCE_KEY = "source"  # the batch key of the source pixels (B, 3, H, W) in [0, 1]


@dataclass
class EditConfig:
    sources: str = option("", "edit task (--control): folder of source images, each named like its target image")
    instructions: str = option(
        "", "edit task (--captions): text file of 'name: instruction' lines; else each target's caption"
    )


def read_instructions(path: str | Path) -> dict[str, str]:
    """`name: instruction` lines -> {name: instruction}; blank lines and `#` comments are skipped."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--captions {path}: cannot read it ({error}); pass a UTF-8 text file") from None
    instructions: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, instruction = line.partition(":")
        if not colon or not name.strip() or not instruction.strip():
            raise UserError(f"--captions {path} line {number}: expected 'name: instruction', got '{line[:60]}'")
        instructions[name.strip()] = instruction.strip()
    if not instructions:
        raise UserError(f"--captions {path} holds no 'name: instruction' line")
    return instructions


def with_instructions(dataset: Any, instructions: dict[str, str], token: str, path: str = "") -> Any:
    """The dataset with each target's prompt replaced by its instruction (by file name or stem); names that
    match no target are one error."""
    records = dataset.records
    known = {record.path.name for record in records} | {record.path.stem for record in records}
    unknown = sorted(name for name in instructions if name not in known)
    if unknown:
        raise UserError(
            f"--captions {path}: no target image named {', '.join(unknown)}; name each line after a target image"
        )

    def instruction(record: Any) -> str:
        text = instructions.get(record.path.name, instructions.get(record.path.stem))
        return record.prompt if text is None else fill_trigger(text, token)

    dataset.records = [dataclasses.replace(record, prompt=instruction(record)) for record in records]
    return dataset


def match_sources(dataset: Any, sources: str) -> dict[Path, Path]:
    """target path -> source path for every target of `dataset`; one error naming every unpaired file."""
    return match_by_name([record.path for record in dataset.records], sources, what="control")


def pair_sources(dataset: Any, files: dict[Path, Path]) -> PairedDataset:
    """Items of `dataset` (image or latent-cache items) with their source image under SOURCE_KEY."""
    return PairedDataset(dataset, files, key=SOURCE_KEY)


def first_source(dataset: Any, files: dict[Path, Path]) -> Path:
    """The source image of the dataset's first item: what validation samples edit."""
    return files[dataset.records[dataset.rows[0]].path]
