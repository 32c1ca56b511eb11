"""On-disk caches of VAE latents and text-encoder outputs (safetensors), and the dataset that reads them.

Layout: `<cache_dir>/latents/<vae fingerprint>/<image sha256>-<transform tag>.safetensors` and
`<cache_dir>/text/<text-encoders fingerprint>/<prompt sha256>.safetensors`. A fingerprint hashes the
module class, its config and every weight byte (tokenizers: their vocabulary), so a changed model never
reads another model's entries; the transform tag names the original size, bucket, resize, crop and
flip, so a changed image, resolution, crop or flip is a miss. Entries are written atomically and each
carries its own key in the metadata, checked on read. Because keys hold no run-specific state, entries
are shared by every run and every subject that uses the same image or prompt with the same model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from personalize.data.dataset import ImageDataset
from personalize.data.transforms import Plan, decide_flip
from personalize.models.encode import encode_images, encode_text
from personalize.models.family import detect_family

log = logging.getLogger(__name__)
ENCODE_VERSION = "1"  # bump when encode_text / encode_images change what they return
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")  # HiDream has four
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Explicit dir, else $PERSONALIZE_CACHE, else ~/.cache/personalize."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("PERSONALIZE_CACHE") or Path.home() / ".cache" / "personalize").expanduser()


def _hash_module(digest: Any, module: torch.nn.Module) -> None:
    digest.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        as_dict = {key: value for key, value in as_dict.items() if not key.startswith("_")}
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy())  # hashed in place, not copied to bytes


def _hash_tokenizer(digest: Any, tokenizer: Any) -> None:
    digest.update(f"{type(tokenizer).__name__}:{tokenizer.model_max_length}".encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())


def vae_fingerprint(vae: torch.nn.Module) -> str:
    digest = hashlib.sha256(f"vae:{ENCODE_VERSION}:mean".encode())
    _hash_module(digest, vae)
    return digest.hexdigest()[:24]


def text_fingerprint(pipe: Any) -> str:
    digest = hashlib.sha256(f"text:{ENCODE_VERSION}:{detect_family(pipe)}".encode())
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if module is not None:
            digest.update(name.encode())
            _hash_module(digest, module)
    for name in TOKENIZERS:
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            digest.update(name.encode())
            _hash_tokenizer(digest, tokenizer)
    return digest.hexdigest()[:24]


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:32]


def has_entry(path: Path, key: str) -> bool:
    """True when `path` is a readable entry written for `key` (a stale or torn file is a miss)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("key") == key
    except (SafetensorError, OSError, ValueError):
        return False


def read_entry(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tensors of the entry written for `key` at `path`, or None (missing, stale or torn): one open."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key:
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError):
        return None


def write_entry(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(
        {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}, str(partial), {"key": key}
    )
    os.replace(partial, path)


@dataclass
class CacheStats:
    latents_hit: int = 0
    latents_encoded: int = 0
    text_hit: int = 0
    text_encoded: int = 0


class CachedDataset(Dataset):
    """Items: latents (C, h, w), the prompt, its encode_text outputs (each without batch dim; unless the
    text is not cached) and the plan fields."""

    cached = True

    def __init__(
        self,
        source: ImageDataset,
        latent_paths: list[dict[bool, Path]],
        text_paths: list[Path | None],
        stats: CacheStats | None = None,
    ):
        self.stats = stats or CacheStats()
        self.source = source  # pixels on demand (personalize.data.paired: an annotator's cache miss)
        self.source_records = source.records
        self.records = source.records
        self.background = source.background
        self.rows = source.rows
        self.buckets = source.buckets
        self.config = source.config
        self.seed = source.seed
        self.report = source.report
        self.latent_paths = latent_paths
        self.text_paths = text_paths
        self.prompts = [source.records[number].prompt for number in source.rows]
        self._plans = [
            {flip: source.plan(index, 0, flip) for flip in paths} for index, paths in enumerate(latent_paths)
        ]
        self._keys = [
            {flip: source.item_key(index, plan) for flip, plan in plans.items()}
            for index, plans in enumerate(self._plans)
        ]
        self._text: dict[Path, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _text_of(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._text:
            entry = load_file(str(path))
            self._text[path] = {name: value[0] for name, value in entry.items()}  # drop the batch dim
        return self._text[path]

    def plan(self, index: int, epoch: int = 0) -> Plan:
        """The transform whose latents item `index` reads in `epoch` (epoch 0's crop, this epoch's flip)."""
        record = self.source_records[self.rows[index]]
        flip = decide_flip(record.flip, self.seed, epoch, index) and True in self.latent_paths[index]
        return self._plans[index][flip]

    def item_key(self, index: int, plan: Plan) -> str:
        return self.source.item_key(index, plan)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (0, index)
        record = self.source_records[self.rows[index]]
        plan = self.plan(index, epoch)
        flip = plan.flip
        entry = load_file(str(self.latent_paths[index][flip]))
        item: dict[str, Any] = {"latents": entry["latents"], "prompt": self.prompts[index]}
        text_path = self.text_paths[index]
        if text_path is not None:
            item.update(self._text_of(text_path))
        item.update(
            is_class=record.is_class,
            original_size=plan.original_size,
            crop_top_left=plan.crop_top_left,
            target_size=plan.target_size,
            key=self._keys[index][flip],
        )
        if "mask" in entry:
            item["mask"] = entry["mask"]
        return item


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def _fill_latents(dataset: ImageDataset, vae: Any, todo: dict[str, tuple[int, Plan, Path]], batch_size: int) -> None:
    by_bucket: dict[tuple[int, ...], list[tuple[str, int, Plan, Path]]] = {}
    for key, (index, plan, path) in todo.items():  # the dataset's bucket: size (+ clip length for video)
        by_bucket.setdefault(tuple(dataset.buckets[index]), []).append((key, index, plan, path))
    total = sum(len(group) for group in by_bucket.values())
    with tqdm(total=total, desc="caching latents", unit="img", disable=total == 0, leave=False) as progress:
        for group in by_bucket.values():
            for chunk in _batches(group, batch_size):
                items = [dataset.render(index, plan) for _, index, plan, _ in chunk]
                latents = encode_images(vae, torch.stack([item["pixels"] for item in items]))  # (B, C, [F,] h, w)
                for row, (key, _, _, path) in enumerate(chunk):
                    tensors = {"latents": latents[row]}
                    if "mask" in items[row]:
                        tensors["mask"] = items[row]["mask"]
                    write_entry(path, key, tensors)
                progress.update(len(chunk))


@torch.no_grad()
def _fill_text(pipe: Any, todo: dict[str, tuple[str, Path]], batch_size: int) -> None:
    pending = list(todo.items())
    with tqdm(total=len(pending), desc="caching text", unit="prompt", disable=not pending, leave=False) as progress:
        for chunk in _batches(pending, batch_size):
            outputs = encode_text(pipe, [prompt for _, (prompt, _) in chunk])
            for row, (key, (_, path)) in enumerate(chunk):
                write_entry(path, key, {name: value[row : row + 1] for name, value in outputs.items()})
            progress.update(len(chunk))


def cache_dataset(
    dataset: ImageDataset,
    pipe: Any,
    cache_dir: str | Path | None = None,
    cache_text: bool = True,
    batch_size: int = 8,
) -> CachedDataset:
    """Encode every item once (pipe.vae and the text encoders, on their device/dtype) and read from disk after.

    flip > 0 caches both orientations; the cached dataset picks one per item and epoch with the same
    seeded coin as the image dataset. random_crop: the cache holds epoch 0's crops (a crop per epoch
    would defeat the cache), which is logged. cache_text=False keeps "prompt" (text-encoder training).
    """
    root = cache_root(cache_dir or dataset.config.cache_dir or None)
    if dataset.config.random_crop:
        log.warning("random_crop with the latent cache: each image keeps the crop of epoch 0")
    latent_dir = root / "latents" / vae_fingerprint(pipe.vae)
    stats = CacheStats()
    latent_paths: list[dict[bool, Path]] = []
    latent_todo: dict[str, tuple[int, Plan, Path]] = {}
    seen_latents: set[str] = set()
    for index in range(len(dataset)):
        record = dataset.records[dataset.rows[index]]
        paths: dict[bool, Path] = {}
        for flip in (False, True) if record.flip > 0 else (False,):
            plan = dataset.plan(index, 0, flip)
            key = dataset.item_key(index, plan)
            path = latent_dir / key[:2] / f"{key}.safetensors"
            paths[flip] = path
            if key in seen_latents:
                continue
            seen_latents.add(key)
            if has_entry(path, key):
                stats.latents_hit += 1
            else:
                latent_todo[key] = (index, plan, path)
        latent_paths.append(paths)
    text_paths: list[Path | None] = [None] * len(dataset)
    text_todo: dict[str, tuple[str, Path]] = {}
    if cache_text:
        text_dir = root / "text" / text_fingerprint(pipe)
        seen: set[str] = set()
        for index in range(len(dataset)):
            prompt = dataset.records[dataset.rows[index]].prompt
            key = prompt_key(prompt)
            path = text_dir / f"{key}.safetensors"
            text_paths[index] = path
            if key in seen:
                continue
            seen.add(key)
            if has_entry(path, key):
                stats.text_hit += 1
            else:
                text_todo[key] = (prompt, path)
    _fill_latents(dataset, pipe.vae, latent_todo, batch_size)
    _fill_text(pipe, text_todo, batch_size)
    stats.latents_encoded, stats.text_encoded = len(latent_todo), len(text_todo)
    log.info(
        "cache %s: latents %d reused, %d encoded; text %d reused, %d encoded",
        root,
        stats.latents_hit,
        stats.latents_encoded,
        stats.text_hit,
        stats.text_encoded,
    )
    return CachedDataset(dataset, latent_paths, text_paths, stats)
