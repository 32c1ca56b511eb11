"""Latent/text caches: equal to encoding on the fly, reused when nothing changed, missed when anything did."""

import copy
import pickle
from pathlib import Path

import pytest
import torch

from personalize.data import DataConfig, build_dataset, build_loader, cache_dataset
from personalize.models.encode import encode_images, encode_text


def config_for(folder: Path, **overrides) -> DataConfig:
    values = {"images": str(folder), "class_word": "cat", "resolution": 64, "bucket_step": 16}
    values.update(overrides)
    return DataConfig(**values)


@torch.no_grad()
def test_cached_items_equal_uncached_encoding(good_folder, tmp_path, tiny_pipelines):
    pipe = tiny_pipelines("tiny-sd15")
    dataset = build_dataset(config_for(good_folder, flip=0.5, repeats=2, alpha_mask=True), seed=3)
    cached = cache_dataset(dataset, pipe, cache_dir=tmp_path / "cache")
    # repeats share entries: 3 images x 2 flips (center crops), one prompt
    assert (cached.stats.latents_encoded, cached.stats.text_encoded) == (6, 1)
    text = encode_text(pipe, ["a photo of sks cat"])["prompt_embeds"][0]
    checked: set[str] = set()
    for epoch in range(3):
        for index in range(len(dataset)):
            item, reference = cached[(epoch, index)], dataset[(epoch, index)]
            assert "pixels" not in item and item["prompt"] == reference["prompt"]  # the text too, as embeddings
            for name in ("original_size", "crop_top_left", "target_size", "key", "is_class"):
                assert item[name] == reference[name]
            if item["key"] in checked:
                continue
            checked.add(item["key"])
            expected = encode_images(pipe.vae, reference["pixels"][None])[0]
            torch.testing.assert_close(item["latents"], expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(item["prompt_embeds"], text)
            torch.testing.assert_close(item["mask"], reference["mask"])
    flips = {key.split("-")[-1] for key in checked}
    assert flips == {"f", "n"}
    batch = next(iter(build_loader(cached, batch_size=2, seed=0)))
    assert batch["latents"].shape[:2] == (2, 4) and batch["prompt_embeds"].shape[:2] == (2, 77)
    # the training loop needs no encoder: the cached dataset holds no module and pickles small
    assert len(pickle.dumps(cached)) < 200_000


def test_hits_and_invalidation(good_folder, tmp_path, tiny_pipelines, make_image):
    pipe = tiny_pipelines("tiny-sd15")
    cache = tmp_path / "cache"

    def stats(config, model=pipe):
        return cache_dataset(build_dataset(config), model, cache_dir=cache).stats

    first = stats(config_for(good_folder))
    assert (first.latents_encoded, first.latents_hit, first.text_encoded) == (3, 0, 1)
    again = stats(config_for(good_folder))
    assert (again.latents_encoded, again.latents_hit, again.text_hit, again.text_encoded) == (0, 3, 1, 0)

    make_image(96, 64, seed=99).save(good_folder / "a.jpg", quality=95)  # changed image
    assert stats(config_for(good_folder)).latents_encoded == 1
    assert stats(config_for(good_folder, resolution=48)).latents_encoded == 3  # changed resolution
    flipped = stats(config_for(good_folder, flip=0.5))  # flipped copies are new, unflipped reused
    assert (flipped.latents_encoded, flipped.latents_hit) == (3, 3)
    assert stats(config_for(good_folder, class_word="dog")).text_encoded == 1  # changed prompt

    other = copy.copy(pipe)
    other.vae = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        next(other.vae.parameters()).add_(1e-3)  # changed model weights
    changed = stats(config_for(good_folder), other)
    assert (changed.latents_encoded, changed.text_hit) == (3, 1)


def test_stale_or_torn_entry_is_rewritten(good_folder, tmp_path, tiny_pipelines):
    pipe = tiny_pipelines("tiny-sd15")
    cached = cache_dataset(build_dataset(config_for(good_folder)), pipe, cache_dir=tmp_path)
    path = cached.latent_paths[0][False]
    path.write_bytes(b"torn")
    again = cache_dataset(build_dataset(config_for(good_folder)), pipe, cache_dir=tmp_path)
    assert again.stats.latents_encoded == 1
    assert again[0]["latents"].shape[0] == 4


def test_cache_dir_from_environment(good_folder, tmp_path, tiny_pipelines, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "env-cache"))
    cache_dataset(build_dataset(config_for(good_folder)), tiny_pipelines("tiny-sd15"))
    assert any((tmp_path / "env-cache" / "latents").rglob("*.safetensors"))


@pytest.mark.parametrize("name", ["tiny-sdxl"])
def test_sdxl_cache_has_pooled_embeds(good_folder, tmp_path, tiny_pipelines, name):
    cached = cache_dataset(build_dataset(config_for(good_folder)), tiny_pipelines(name), cache_dir=tmp_path)
    batch = next(iter(build_loader(cached, batch_size=3, shuffle=False)))
    assert {"latents", "prompt_embeds", "pooled_prompt_embeds", "original_size", "crop_top_left"} <= set(batch)
