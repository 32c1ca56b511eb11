"""The first contract: build_dataset -> build_loader batches, one bucket per batch."""

from pathlib import Path

import torch

from personalize.data import DataConfig, build_dataset, build_loader


def test_items_follow_the_contract(good_folder: Path):
    dataset = build_dataset(DataConfig(images=str(good_folder), class_word="cat", resolution=64, bucket_step=16))
    assert [path.name for path in dataset.report.used] == ["a.jpg", "b.png", "c.webp"]
    assert dataset.report.skipped == []
    item = dataset[0]
    assert item["prompt"] == "a photo of sks cat"
    assert item["is_class"] is False
    height, width = item["target_size"]
    assert item["pixels"].shape == (3, height, width)
    assert height * width <= 64 * 64 and width > height  # landscape image -> landscape bucket
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    assert item["original_size"] == (64, 96)
    assert "mask" not in item


def test_loader_batches_share_a_bucket_and_repeat_for_a_seed(good_folder: Path):
    config = DataConfig(images=str(good_folder), resolution=64, bucket_step=16, repeats=3, flip=0.5)
    dataset = build_dataset(config)
    assert len(dataset) == 9

    def run(seed):
        loader = build_loader(dataset, batch_size=2, seed=seed, num_workers=0)
        return [(batch["key"], batch["pixels"]) for batch in loader]

    first = run(0)
    for keys, pixels in first:
        sizes = {tuple(pixels.shape[-2:])}
        assert len(sizes) == 1 and len(keys) == pixels.shape[0]
    assert sum(len(keys) for keys, _ in first) == 9
    again = run(0)
    assert [keys for keys, _ in first] == [keys for keys, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again))
    assert [keys for keys, _ in run(1)] != [keys for keys, _ in first]


def test_batch_fields(good_folder: Path):
    dataset = build_dataset(DataConfig(images=str(good_folder), resolution=64, bucket_step=16, alpha_mask=True))
    batch = next(iter(build_loader(dataset, batch_size=4, num_workers=0)))
    size = batch["pixels"].shape[0]
    assert batch["is_class"].dtype == torch.bool and batch["is_class"].shape == (size,)
    for name in ("original_size", "crop_top_left", "target_size"):
        assert batch[name].dtype == torch.long and batch[name].shape == (size, 2)
    assert batch["mask"].shape == (size, 1, *batch["pixels"].shape[-2:])
    assert isinstance(batch["prompt"], list)


def test_workers_and_epochs_give_the_same_batches(good_folder: Path):
    dataset = build_dataset(DataConfig(images=str(good_folder), resolution=64, bucket_step=16, flip=0.5, repeats=2))

    def epochs(num_workers, count=2):
        loader = build_loader(dataset, batch_size=2, seed=4, num_workers=num_workers)
        return [[batch["key"] for batch in loader] for _ in range(count)]

    in_process, with_worker = epochs(0), epochs(1)
    assert in_process == with_worker
    assert in_process[0] != in_process[1]  # the next pass is the next epoch (new order and flips)
    loader = build_loader(dataset, batch_size=2, seed=4, num_workers=0)
    loader.batch_sampler.set_epoch(1)  # resume at epoch 1
    assert [batch["key"] for batch in loader] == in_process[1]
    assert len(loader) == len(in_process[0])


def test_accelerate_sharding_keeps_whole_batches():
    from accelerate.data_loader import BatchSamplerShard

    from personalize.data.loader import BucketBatchSampler

    buckets = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 1
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=1)
    seen = []
    for rank in range(2):
        sampler.set_epoch(0)
        for batch in BatchSamplerShard(sampler, num_processes=2, process_index=rank):
            assert len({buckets[index] for _, index in batch}) == 1
            seen.extend(index for _, index in batch)
    assert set(seen) == set(range(len(buckets)))
