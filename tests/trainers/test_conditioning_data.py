"""Paired data for conditioning adapters: name matching, the canny/tile annotators, aligned crops."""

import pytest
import torch
from PIL import Image

from personalize.data import DataConfig, build_dataset
from personalize.data.paired import build_paired, canny, match_by_name, tile
from personalize.errors import UserError


def _square(size=32):
    """(3, size, size) in [0, 1]: a white square on black, 8 px from each side."""
    image = torch.zeros(3, size, size)
    image[:, 8:-8, 8:-8] = 1.0
    return image


def test_canny_finds_the_outline_of_a_square_and_nothing_in_flat_areas():
    edges = canny(_square())
    assert edges.shape == (3, 32, 32) and set(edges.unique().tolist()) <= {0.0, 1.0}
    mask = edges[0].bool()
    assert mask[6:10, 12:20].any() and mask[12:20, 6:10].any()  # top and left sides
    assert not mask[:4].any() and not mask[14:18, 14:18].any()  # flat background and inside
    assert torch.equal(canny(torch.full((3, 16, 16), 0.5)), torch.zeros(3, 16, 16))


def test_canny_edges_are_thin():
    """Non-maximum suppression: a step edge is at most 2 px wide, not the blurred band."""
    image = torch.zeros(3, 32, 32)
    image[:, :, 16:] = 1.0
    row = canny(image)[0, 16]
    assert 1 <= int(row.sum()) <= 2 and row[14:18].sum() == row.sum()


def test_tile_is_a_blurred_copy():
    image = _square()
    blurred = tile(image)
    assert blurred.shape == image.shape and blurred.min() >= 0 and blurred.max() <= 1
    assert (blurred - image).abs().mean() > 0.01  # changed near edges
    assert torch.allclose(tile(torch.full((3, 16, 16), 0.3)), torch.full((3, 16, 16), 0.3), atol=1e-5)


def _folder(path, names, color="red", size=(48, 40)):
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, color).save(path / name)
    return path


def test_mismatched_folders_are_an_error_listing_the_unmatched_names(tmp_path):
    images = [tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"]
    conditioning = _folder(tmp_path / "cond", ["a.png", "b.png", "zzz.png"])
    with pytest.raises(UserError) as error:
        match_by_name(images, conditioning)
    message = str(error.value)
    assert "c.jpg" in message and "zzz.png" in message and "a.jpg" not in message
    with pytest.raises(UserError, match="not a folder"):
        match_by_name(images, tmp_path / "missing")


def test_conditioning_files_get_the_crop_of_their_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):  # left half black, right half white: a crop offset would show
        picture = Image.new("RGB", (96, 64), "black")
        picture.paste(Image.new("RGB", (48, 64), "white"), (48, 0))
        picture.save(images / f"p{index}.png")
        picture.resize((48, 32)).save(tmp_path / f"p{index}.png")  # conditioning at half the resolution
    conditioning = tmp_path / "cond"
    conditioning.mkdir()
    for index in range(2):
        (tmp_path / f"p{index}.png").rename(conditioning / f"p{index}.png")
    dataset = build_dataset(DataConfig(images=str(images), resolution=64, bucketing=False, num_workers=0))
    paired = build_paired(dataset, str(conditioning))
    item = paired[(0, 0)]
    assert item["conditioning"].shape == item["pixels"].shape == (3, 64, 64)
    assert (item["conditioning"] - item["pixels"].add(1).div(2)).abs().mean() < 0.02  # same crop, same content
    annotated = build_paired(dataset, "", "canny")[(0, 1)]["conditioning"]
    assert annotated.shape == (3, 64, 64) and annotated[0, :, 28:36].sum() > 0  # the vertical edge
    reference = build_paired(dataset, "", "", key="reference")[(0, 0)]
    assert torch.equal(reference["reference"], reference["pixels"].add(1).div(2))


def test_hysteresis_keeps_weak_pixels_connected_to_strong_ones():
    """Component labelling equals growing the strong pixels through weak ones until nothing changes."""
    import torch.nn.functional as F

    from personalize.data.paired import hysteresis

    def grow(strong, weak):
        edges = strong
        while True:
            grown = F.max_pool2d(edges[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & weak
            if torch.equal(grown, edges):
                return edges
            edges = grown

    generator = torch.Generator().manual_seed(0)
    for size in (17, 64):
        weak = torch.rand(size, size, generator=generator) < 0.45
        strong = weak & (torch.rand(size, size, generator=generator) < 0.02)
        assert torch.equal(hysteresis(strong, weak), grow(strong, weak))
    spiral = torch.zeros(9, 9, dtype=torch.bool)  # one long chain: only its far end is strong
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = spiral[2, :7] = True
    strong = torch.zeros_like(spiral)
    strong[2, 6] = True
    assert torch.equal(hysteresis(strong, spiral), spiral)


@pytest.mark.parametrize("annotator", ["canny", "tile"])
def test_annotator_outputs_are_cached_per_image_and_crop(tmp_path, annotator):
    from personalize.data.paired import annotate

    images = tmp_path / "images"
    images.mkdir()
    picture = Image.new("RGB", (96, 64), "black")
    picture.paste(Image.new("RGB", (48, 64), "white"), (48, 0))
    picture.save(images / "p0.png")
    config = DataConfig(images=str(images), resolution=64, bucketing=False, flip=0.5, cache_dir=str(tmp_path / "c"))
    dataset = build_dataset(config)
    paired = build_paired(dataset, "", annotator)
    first = [paired[(epoch, 0)] for epoch in range(4)]
    transforms = {dataset.plan(0, epoch).tag() for epoch in range(4)}
    assert len(transforms) == 2  # the seeded coin flips this image in some epochs and not others
    entries = sorted((tmp_path / "c" / "conditioning" / annotator).iterdir())
    assert len(entries) == 2  # one entry per image and transform, whatever the epoch
    for item in first:
        expected = annotate(annotator, item["pixels"].add(1).div(2))
        assert torch.equal(item["conditioning"], expected)
    again = build_paired(build_dataset(config), "", annotator)  # a new run reads the entries back
    for epoch, item in enumerate(first):
        assert torch.equal(again[(epoch, 0)]["conditioning"], item["conditioning"])
    assert sorted((tmp_path / "c" / "conditioning" / annotator).iterdir()) == entries


def test_pairs_over_the_latent_cache_match_the_pixels_the_latents_came_from(tmp_path, tiny_pipelines):
    """The conditioning recipe trains from the latent cache: each item's conditioning (an annotator's, or
    the reference pixels of IP-Adapter) gets the crop and flip of the latents it is paired with."""
    from personalize.data import cache_dataset

    from .conftest import CAT

    config = DataConfig(images=str(CAT), resolution=64, bucketing=False, flip=0.5, cache_dir=str(tmp_path / "c"))
    dataset = build_dataset(config)
    cached = cache_dataset(dataset, tiny_pipelines("tiny-sd15"))
    for annotator, key in (("canny", "conditioning"), ("", "reference")):
        over_cache = build_paired(cached, "", annotator, key=key)
        over_pixels = build_paired(dataset, "", annotator, key=key)
        for epoch in range(3):
            item, reference = over_cache[(epoch, 1)], over_pixels[(epoch, 1)]
            assert "latents" in item and "pixels" not in item and item["prompt"] == reference["prompt"]
            assert torch.equal(item[key], reference[key])
