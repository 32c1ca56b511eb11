"""`build_loader`: batches drawn from one bucket at a time, reproducible for a seed.

The batch sampler shuffles each bucket's indices and the order of the batches with a generator seeded
by (seed, epoch) and yields `(epoch, index)` pairs, so the dataset's crops and flips follow the same
epoch in the main process and in (persistent) workers. Every pass over the loader is the next epoch;
`loader.batch_sampler.set_epoch(n)` jumps to epoch n (resume).

The sampler deliberately has no `batch_size` attribute: accelerate's `BatchSamplerShard` then treats
batches as variable-length lists and shards or pads whole batches, never splicing indices of two
buckets into one batch (it would, to even out a short last batch, if it saw a batch size).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from personalize.data.buckets import Size


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    def __init__(
        self, buckets: Sequence[Size], batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.groups: dict[Size, list[int]] = {}
        for index, bucket in enumerate(buckets):
            self.groups.setdefault(tuple(bucket), []).append(index)  # type: ignore[arg-type]
        self.items_per_batch = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for bucket in sorted(self.groups):
            indices = self.groups[bucket]
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.items_per_batch):
                batch = indices[start : start + self.items_per_batch]
                if len(batch) == self.items_per_batch or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        self.epoch += 1
        for batch in self.batches(epoch):
            yield [(epoch, index) for index in batch]

    def __len__(self) -> int:
        full, partial = 0, 0
        for indices in self.groups.values():
            full += len(indices) // self.items_per_batch
            partial += 1 if len(indices) % self.items_per_batch else 0
        return full if self.drop_last else full + partial


TENSOR_SIZES = ("original_size", "crop_top_left", "target_size")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings as lists, sizes as LongTensor (B, 2), is_class as BoolTensor (B,)."""
    batch: dict[str, Any] = {}
    for name in items[0]:
        values = [item[name] for item in items]
        if name in TENSOR_SIZES:
            batch[name] = torch.tensor(values, dtype=torch.long)  # (B, 2)
        elif name == "is_class":
            batch[name] = torch.tensor(values, dtype=torch.bool)  # (B,)
        elif isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


def auto_workers(dataset: Any) -> int:
    """Decoding JPEGs benefits from workers; reading cached tensors does not (it only adds start-up)."""
    if getattr(dataset, "cached", False):
        return 0
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def build_loader(
    dataset: Any,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over an ImageDataset or CachedDataset; num_workers None -> the config's (-1 -> auto)."""
    if num_workers is None:
        config = getattr(dataset, "config", None)
        num_workers = getattr(config, "num_workers", -1)
    if num_workers < 0:
        num_workers = auto_workers(dataset)
    sampler = BucketBatchSampler(dataset.buckets, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
