"""Which files to train on and with what prompt: folders, sidecar captions, dataset YAML, kohya folders.

A *subset* is one folder with its own repeats, prompt, caption extension, flip and class flag. The
plain config gives one instance subset (plus one `N_prompt` subset per kohya-style sub-folder, plus
the class-image subset for prior preservation); a dataset YAML lists subsets explicitly:

    subsets:
      - {images: photos/, repeats: 10, instance_prompt: "a photo of [trigger] cat", flip: 0.5}
      - {images: class/, is_class: true, instance_prompt: "a photo of a cat"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from personalize.config import from_dict, option, read_yaml_file
from personalize.data.config import DataConfig
from personalize.errors import UserError

TRIGGER = "[trigger]"
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Files that live beside images on purpose and are not training images.
SIDECAR_SUFFIXES = {".txt", ".caption", ".yaml", ".yml"}


@dataclass
class SubsetSpec:
    """One entry of a dataset YAML's `subsets:` list (unset keys inherit the data config)."""

    images: str = option("", "folder of this subset (relative paths: to the YAML's folder)")
    repeats: int | None = option(None, "times each image appears per epoch")
    caption_extension: str | None = option(None, "sidecar caption extension")
    instance_prompt: str | None = option(None, "prompt of images without a caption ('[trigger]' -> token)")
    is_class: bool = option(False, "class (regularization) images for prior preservation")
    flip: float | None = option(None, "horizontal flip probability")
    recursive: bool | None = option(None, "also read sub-folders")
    limit: int = option(0, "use at most this many images (0: all)")


@dataclass
class Subset:
    folder: Path
    prompt: str
    repeats: int = 1
    caption_extension: str = ".txt"
    is_class: bool = False
    flip: float = 0.0
    recursive: bool = False
    limit: int = 0
    exclude: list[Path] = field(default_factory=list)


@dataclass
class Candidate:
    """A file that should be an image of a subset (not yet decoded)."""

    path: Path
    prompt: str
    subset: Subset


def fill_trigger(text: str, token: str) -> str:
    return text.replace(TRIGGER, token).strip()


def instance_prompt(config: DataConfig) -> str:
    if config.instance_prompt:
        return fill_trigger(config.instance_prompt, config.token)
    return " ".join(part for part in ("a photo of", config.token, config.class_word) if part)


def class_prompt(config: DataConfig) -> str:
    if config.class_prompt:
        return fill_trigger(config.class_prompt, config.token)
    if not config.class_word:
        raise UserError("prior preservation needs a class: set data.class_word (e.g. cat) or data.class_prompt")
    return f"a photo of {config.class_word}"


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"{what} {folder} does not exist; point it at a folder of images")
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder (a dataset file must end in .yaml or .yml)")
    return folder


def kohya_subsets(parent: Subset, token: str) -> list[Subset]:
    """Sub-folders named `10_sks cat`: 10 repeats, prompt 'sks cat' (the kohya convention)."""
    found = []
    for child in sorted(parent.folder.iterdir()):
        match = KOHYA_FOLDER.match(child.name)
        if child.is_dir() and match:
            found.append(
                Subset(
                    folder=child,
                    prompt=fill_trigger(match.group(2), token),
                    repeats=int(match.group(1)),
                    caption_extension=parent.caption_extension,
                    is_class=parent.is_class,
                    flip=parent.flip,
                    recursive=parent.recursive,
                )
            )
    return found


def _with_kohya(subset: Subset, token: str) -> list[Subset]:
    children = kohya_subsets(subset, token)
    subset.exclude = [child.folder for child in children]
    return [subset, *children]


def _yaml_subsets(config: DataConfig) -> list[Subset]:
    path = Path(config.images).expanduser()
    data = read_yaml_file(path)
    unknown = [key for key in data if key != "subsets"]
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'; a dataset file has one key, 'subsets'")
    entries = data.get("subsets")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: 'subsets' must be a non-empty list of {{images: DIR, repeats: N, ...}}")
    subsets: list[Subset] = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: subsets[{number}] must be a mapping like {{images: DIR, repeats: 10}}")
        spec = from_dict(SubsetSpec, entry, prefix=f"subsets[{number}].")
        if not spec.images:
            raise UserError(f"{path}: subsets[{number}] needs 'images: FOLDER'")
        folder = _folder(path.parent / Path(spec.images).expanduser(), f"subsets[{number}].images")
        if spec.instance_prompt is not None:
            prompt = fill_trigger(spec.instance_prompt, config.token)
        else:
            prompt = class_prompt(config) if spec.is_class else instance_prompt(config)
        subset = Subset(
            folder=folder,
            prompt=prompt,
            repeats=spec.repeats if spec.repeats is not None else (1 if spec.is_class else config.repeats),
            caption_extension=spec.caption_extension or config.caption_extension,
            is_class=spec.is_class,
            flip=spec.flip if spec.flip is not None else config.flip,
            recursive=spec.recursive if spec.recursive is not None else config.recursive,
            limit=spec.limit,
        )
        subsets.extend(_with_kohya(subset, config.token))
    return subsets


def subsets_of(config: DataConfig) -> list[Subset]:
    """All subsets a config names: instance folder or dataset YAML, kohya sub-folders, class images."""
    if not config.images:
        raise UserError("no training images: set data.images (or --images) to a folder of photos")
    if config.images.endswith((".yaml", ".yml")):
        subsets = _yaml_subsets(config)
    else:
        main = Subset(
            folder=_folder(config.images, "images folder"),
            prompt=instance_prompt(config),
            repeats=config.repeats,
            caption_extension=config.caption_extension,
            flip=config.flip,
            recursive=config.recursive,
        )
        subsets = _with_kohya(main, config.token)
    if config.num_class_images > 0 and not config.class_dir:
        raise UserError("num_class_images needs data.class_dir: a folder for the class images")
    if config.class_dir:
        subsets.append(
            Subset(
                folder=_folder(config.class_dir, "class_dir"),
                prompt=class_prompt(config),
                caption_extension=config.caption_extension,
                is_class=True,
                flip=config.flip,
                limit=config.num_class_images,
            )
        )
    return subsets


def _files(subset: Subset) -> list[Path]:
    pattern = "**/*" if subset.recursive else "*"
    files = []
    for path in sorted(subset.folder.glob(pattern)):
        if any(path.is_relative_to(excluded) for excluded in subset.exclude):
            continue
        if path.is_file() and path.suffix.lower() not in SIDECAR_SUFFIXES | {subset.caption_extension.lower()}:
            files.append(path)
    return files


def orphan_sidecars(subset: Subset) -> list[Path]:
    """Caption-like files (notes.txt, a.caption) with no image of the same name: they train nothing."""
    pattern = "**/*" if subset.recursive else "*"
    images = {path.with_suffix("") for path in _files(subset)}
    return [
        path
        for path in sorted(subset.folder.glob(pattern))
        if path.is_file()
        and path.suffix.lower() in SIDECAR_SUFFIXES | {subset.caption_extension.lower()}
        and not any(path.is_relative_to(excluded) for excluded in subset.exclude)
        and path.with_suffix("") not in images
    ]


def caption_for(path: Path, subset: Subset, token: str) -> str:
    """The sidecar caption (`caption_extension`, then .txt, then .caption) or the subset prompt."""
    for extension in dict.fromkeys([subset.caption_extension, ".txt", ".caption"]):
        sidecar = path.with_suffix(extension)
        if sidecar.is_file():
            try:
                text = " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
            except OSError:
                continue
            if text:
                return fill_trigger(text, token)
    return subset.prompt


def candidates(subset: Subset, token: str) -> list[Candidate]:
    return [Candidate(path, caption_for(path, subset, token), subset) for path in _files(subset)]
