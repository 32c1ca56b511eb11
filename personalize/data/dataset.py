"""`build_dataset`: scan, decode-check and bucket every image once; items are decoded on demand.

Each usable file becomes a `Record` (content hash, oriented size, prompt, bucket); unusable files are
named in `dataset.report`. With `data.frames` set (video models) every item is a clip (3, F, H, W): a
video file its first `frames` frames at `data.fps` (personalize.data.video), a still image a one-frame
clip; the batches then group clips of the same length as well as the same bucket. An index may be an
int (epoch 0) or an `(epoch, index)` pair, which is what `build_loader`'s sampler yields: random crops
and flips are then a function of (seed, epoch, index) alone and identical in every worker process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from personalize.data.buckets import Size, choose_bucket
from personalize.data.config import DataConfig
from personalize.data.decode import MAX_PIXELS, BadImage, decode, parse_color, read_bytes
from personalize.data.sources import Candidate, orphan_sidecars, subsets_of
from personalize.data.sources import candidates as list_candidates
from personalize.data.transforms import Plan, apply_plan, decide_flip, make_plan, mask_tensor, to_tensor
from personalize.data.video import is_video, read_clip
from personalize.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    """What was used, what was skipped and why, and what was used with a warning."""

    used: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = len(self.used) + len(self.skipped)
        if not self.skipped:
            return f"using all {total} files"
        names = ", ".join(f"{path.name} ({reason})" for path, reason in self.skipped)
        return f"skipped {len(self.skipped)} of {total} files: {names}"


@dataclass(frozen=True)
class Record:
    path: Path
    digest: str  # SHA-256 of the file bytes
    size: Size  # (h, w) after EXIF orientation
    has_alpha: bool
    prompt: str
    is_class: bool
    flip: float
    repeats: int
    bucket: Size  # (H, W)
    frames: int = 1  # frames of the clip it gives (video models); 1 for a still image


DEFAULT_RESOLUTION = 512  # for callers of personalize.data without a model; the trainers use the model's


def _sized(config: DataConfig) -> DataConfig:
    return config if config.resolution else dataclasses.replace(config, resolution=DEFAULT_RESOLUTION)


def _check(config: DataConfig) -> None:
    if config.resolution < config.bucket_step:
        raise UserError(f"data.resolution {config.resolution} is below data.bucket_step {config.bucket_step}")
    if config.bucket_step < 8 or config.bucket_step % 8:
        raise UserError(f"data.bucket_step must be a multiple of 8 (the VAE downsamples 8x), got {config.bucket_step}")
    if not 0.0 <= config.flip <= 1.0:
        raise UserError(f"data.flip is a probability between 0 and 1, got {config.flip}")
    if config.repeats < 1:
        raise UserError(f"data.repeats must be at least 1, got {config.repeats}")
    if config.frames < 0 or config.fps < 0:
        raise UserError(f"data.frames and data.fps cannot be negative (got {config.frames}, {config.fps:g})")
    if config.max_aspect < 1.0:
        raise UserError(f"data.max_aspect must be at least 1.0, got {config.max_aspect}")
    try:
        parse_color(config.background)
    except BadImage as error:
        raise UserError(f"data.background: {error}; use a name like white or #rrggbb") from None


def _record(candidate: Candidate, config: DataConfig, report: DataReport) -> Record | None:
    path = candidate.path
    clip = bool(config.frames) and is_video(path)
    try:
        data = read_bytes(path)
        if clip:
            size, has_alpha = read_clip(data, config.frames, config.fps).size, False
        else:
            decoded = decode(data, parse_color(config.background), MAX_PIXELS, draft=(1, 1))  # JPEG: 1/8 scale
            size, has_alpha = decoded.size, decoded.alpha is not None
    except BadImage as error:
        report.skipped.append((path, str(error)))
        return None
    bucket = choose_bucket(
        size, config.resolution, config.bucket_step, config.max_aspect, config.bucketing, config.no_upscale
    )
    if min(bucket) < config.bucket_step:
        report.skipped.append((path, f"too small: {size[1]}x{size[0]} with no_upscale"))
        return None
    if size[0] < bucket[0] or size[1] < bucket[1]:
        report.warnings.append(
            f"{path.name} is {size[1]}x{size[0]}, smaller than its {bucket[1]}x{bucket[0]} bucket: upscaled "
            "(set data.no_upscale to train it at its own size)"
        )
    report.used.append(path)
    subset = candidate.subset
    return Record(
        path=path,
        digest=hashlib.sha256(data).hexdigest(),
        size=size,
        has_alpha=has_alpha,
        prompt=candidate.prompt,
        is_class=subset.is_class,
        flip=subset.flip,
        repeats=subset.repeats,
        bucket=bucket,
        frames=config.frames if clip else 1,
    )


def scan(config: DataConfig) -> tuple[list[Record], DataReport]:
    """Decode every candidate file once: usable ones become records, the rest are reported."""
    config = _sized(config)
    _check(config)
    report = DataReport()
    records: list[Record] = []
    for subset in subsets_of(config):
        taken = 0
        for candidate in list_candidates(subset, config.token):
            if subset.limit and taken >= subset.limit:
                break
            record = _record(candidate, config, report)
            if record is not None:
                records.append(record)
                taken += 1
        for orphan in orphan_sidecars(subset):
            report.skipped.append((orphan, f"not an image, and no image named {orphan.stem}.* for it to caption"))
        if subset.limit and taken < subset.limit:
            report.warnings.append(
                f"{subset.folder} has {taken} usable images, {subset.limit} were asked for "
                "(generate the rest with ensure_class_images)"
            )
    return records, report


class ImageDataset(Dataset):
    """Items: pixels (3, H, W) in [-1, 1], prompt, is_class, original_size, crop_top_left, target_size, key."""

    def __init__(self, records: list[Record], report: DataReport, config: DataConfig, seed: int = 0):
        self.records = records
        self.report = report
        self.config = config
        self.seed = seed
        self.background = parse_color(config.background)
        self.rows = [number for number, record in enumerate(records) for _ in range(record.repeats)]
        # clips batch with clips of the same length: the frame count joins the bucket (video models)
        video = bool(config.frames)
        self.buckets: list[Size] = [
            (*records[number].bucket, records[number].frames) if video else records[number].bucket  # type: ignore[misc]
            for number in self.rows
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def plan(self, index: int, epoch: int = 0, flip: bool | None = None) -> Plan:
        """The transform of item `index` in `epoch` (flip=None: decided by the seeded coin)."""
        record = self.records[self.rows[index]]
        if flip is None:
            flip = decide_flip(record.flip, self.seed, epoch, index)
        return make_plan(record.size, record.bucket, self.seed, epoch, index, self.config.random_crop, flip)

    def item_key(self, index: int, plan: Plan) -> str:
        record = self.records[self.rows[index]]
        red, green, blue = self.background
        background = f"-bg{red:02x}{green:02x}{blue:02x}" if record.has_alpha else ""
        clip = f"-f{record.frames}r{self.config.fps:g}" if self.config.frames and is_video(record.path) else ""
        return f"{record.digest[:32]}-{plan.tag()}{background}{clip}"

    def render(self, index: int, plan: Plan) -> dict[str, Any]:
        record = self.records[self.rows[index]]
        data = read_bytes(record.path)
        if hashlib.sha256(data).hexdigest() != record.digest:
            raise BadImage("changed on disk since the dataset was built")
        if self.config.frames and is_video(record.path):  # a clip: every frame through the same plan, (3, F, H, W)
            clip = read_clip(data, record.frames, self.config.fps)
            pixels = torch.stack([to_tensor(apply_plan(frame, plan)) for frame in clip.frames], dim=1)
            return self._item(record, plan, index, pixels, None)
        decoded = decode(data, self.background, draft=plan.resized)
        pixels = to_tensor(apply_plan(decoded.image, plan))  # (3, H, W)
        if self.config.frames:  # a still image in a video run: a one-frame clip (3, 1, H, W)
            pixels = pixels[:, None]
        return self._item(record, plan, index, pixels, decoded.alpha)

    def _item(self, record: Record, plan: Plan, index: int, pixels: torch.Tensor, alpha: Any) -> dict[str, Any]:
        item: dict[str, Any] = {
            "pixels": pixels,
            "prompt": record.prompt,
            "is_class": record.is_class,
            "original_size": plan.original_size,
            "crop_top_left": plan.crop_top_left,
            "target_size": plan.target_size,
            "key": self.item_key(index, plan),
        }
        if self.config.alpha_mask:
            if alpha is None:
                item["mask"] = torch.ones(1, *plan.target_size)
            else:
                item["mask"] = mask_tensor(apply_plan(alpha, plan))
        return item

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (0, index)
        try:
            return self.render(index, self.plan(index, epoch))
        except BadImage as error:  # the file changed on disk after the scan
            record = self.records[self.rows[index]]
            message = f"{record.path}: {error}; restore it or rebuild the dataset"
            raise UserError(message) from None


def build_dataset(config: DataConfig, seed: int = 0) -> ImageDataset:
    """Scan the configured images; UserError when none is usable. Skips and warnings are logged once."""
    config = _sized(config)
    records, report = scan(config)
    if not any(not record.is_class for record in records):
        where = config.images
        detail = report.summary() if report.skipped else "no files found"
        media = "MP4/GIF clips or " if config.frames else ""
        raise UserError(f"no usable training image in {where}: {detail}; add {media}JPEG, PNG or WebP photos")
    if report.skipped:
        log.warning(report.summary())
    for warning in report.warnings:
        log.warning(warning)
    return ImageDataset(records, report, config, seed)
