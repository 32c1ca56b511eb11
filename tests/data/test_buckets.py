"""Buckets keep the area and aspect; crops and flips are deterministic for a seed and mirror exactly."""

import torch

from personalize.data import DataConfig, build_dataset
from personalize.data.buckets import bucket_sizes, choose_bucket, nearest_bucket


def test_bucket_sizes_preserve_area():
    buckets = bucket_sizes(512, 64, max_aspect=2.0)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert height * width <= 512 * 512 and height * width >= 0.75 * 512 * 512
        assert max(height / width, width / height) <= 2.0
    assert bucket_sizes(512, 64) == sorted(set(bucket_sizes(512, 64)))


def test_choose_bucket():
    assert nearest_bucket((3000, 4000), bucket_sizes(512)) == (448, 576)  # 4:3 landscape
    assert choose_bucket((4000, 3000), 512) == (576, 448)
    widest = max(bucket_sizes(512), key=lambda size: size[1] / size[0])
    assert choose_bucket((1000, 10000), 512) == widest == (384, 640)  # beyond max_aspect: the widest bucket
    assert choose_bucket((3000, 4000), 512, bucketing=False) == (512, 512)
    small = choose_bucket((300, 400), 512, no_upscale=True)
    assert small[0] <= 300 and small[1] <= 400 and small[1] > small[0]
    assert choose_bucket((300, 400), 512) == (448, 576)  # upscaled by default


def test_crops_and_flips_are_deterministic(tmp_path, make_image):
    make_image(120, 64, seed=1).save(tmp_path / "wide.png")
    make_image(64, 120, seed=2).save(tmp_path / "tall.png")
    config = DataConfig(
        images=str(tmp_path), resolution=48, bucket_step=16, random_crop=True, flip=0.5, bucketing=False, repeats=8
    )
    one, two = build_dataset(config, seed=7), build_dataset(config, seed=7)
    other = build_dataset(config, seed=8)
    crops = [[one[(epoch, i)]["crop_top_left"] for i in range(len(one))] for epoch in range(3)]
    assert crops == [[two[(epoch, i)]["crop_top_left"] for i in range(len(two))] for epoch in range(3)]
    assert crops[0] != crops[1]  # random crops change per epoch
    assert crops[0] != [other[(0, i)]["crop_top_left"] for i in range(len(other))]
    assert torch.equal(one[(2, 3)]["pixels"], two[(2, 3)]["pixels"])
    for index in range(len(one)):
        for epoch in range(2):
            plain = one.render(index, one.plan(index, epoch, flip=False))
            mirrored = one.render(index, one.plan(index, epoch, flip=True))
            assert torch.equal(mirrored["pixels"], plain["pixels"].flip(-1))
            resized_width = one.plan(index, epoch).resized[1]
            assert mirrored["crop_top_left"][1] == resized_width - plain["crop_top_left"][1] - 48
    flips = [one[(0, i)]["key"].endswith("-f") for i in range(len(one))]
    assert 0 < sum(flips) < len(flips)


def test_center_crop_without_flip_is_the_same_every_epoch(tmp_path, make_image):
    make_image(100, 64, seed=1).save(tmp_path / "a.png")
    dataset = build_dataset(DataConfig(images=str(tmp_path), resolution=48, bucket_step=16, bucketing=False))
    assert dataset[(0, 0)]["key"] == dataset[(5, 0)]["key"]
    assert dataset[0]["crop_top_left"] == (0, (75 - 48) // 2)  # 100x64 -> 75x48, centered


def test_no_upscale_trains_small_images_at_their_size(tmp_path, make_image):
    make_image(40, 36, seed=1).save(tmp_path / "small.png")
    make_image(10, 10, seed=2).save(tmp_path / "tiny.png")
    make_image(200, 150, seed=3).save(tmp_path / "big.png")
    config = DataConfig(images=str(tmp_path), resolution=64, bucket_step=16, no_upscale=True)
    dataset = build_dataset(config)
    assert dataset.report.skipped == [(tmp_path / "tiny.png", "too small: 10x10 with no_upscale")]
    sizes = {record.path.name: record.bucket for record in dataset.records}
    assert sizes["small.png"] == (32, 32)  # inside 36 x 40, never enlarged
    assert sizes["big.png"][0] * sizes["big.png"][1] <= 64 * 64 and sizes["big.png"][1] > sizes["big.png"][0]
    assert dataset.report.warnings == []
