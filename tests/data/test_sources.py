"""Prompts and subsets: instance prompt, captions, [trigger], kohya folders, dataset YAML, class images."""

from pathlib import Path

import pytest

from personalize.data import DataConfig, build_dataset
from personalize.errors import UserError

SMALL = {"resolution": 32, "bucket_step": 16}


def prompts_by_name(dataset) -> dict[str, tuple[str, bool, int]]:
    counts: dict[int, int] = {}
    for number in dataset.rows:
        counts[number] = counts.get(number, 0) + 1
    return {
        record.path.name: (record.prompt, record.is_class, counts[number])
        for number, record in enumerate(dataset.records)
    }


def test_kohya_folders_and_captions(tmp_path: Path, make_image):
    root = tmp_path / "train"
    (root / "10_sks cat").mkdir(parents=True)
    (root / "3_[trigger] dog").mkdir()
    (root / "notes").mkdir()
    make_image(32, 32, seed=1).save(root / "top.png")
    make_image(32, 32, seed=2).save(root / "10_sks cat" / "one.png")
    make_image(32, 32, seed=3).save(root / "10_sks cat" / "two.png")
    (root / "10_sks cat" / "two.caption").write_text("sks cat  sleeping\n")
    make_image(32, 32, seed=4).save(root / "3_[trigger] dog" / "three.png")
    make_image(32, 32, seed=5).save(root / "notes" / "ignored.png")
    dataset = build_dataset(DataConfig(images=str(root), token="zwx", class_word="pet", repeats=2, **SMALL))
    assert prompts_by_name(dataset) == {
        "top.png": ("a photo of zwx pet", False, 2),
        "one.png": ("sks cat", False, 10),
        "two.png": ("sks cat sleeping", False, 10),
        "three.png": ("zwx dog", False, 3),
    }
    assert len(dataset) == 25


def test_instance_prompt_and_caption_extension(tmp_path: Path, make_image):
    make_image(32, 32).save(tmp_path / "a.png")
    make_image(32, 32).save(tmp_path / "b.png")
    (tmp_path / "a.tags").write_text("[trigger], outdoors")
    (tmp_path / "b.txt").write_text("   ")  # empty caption -> the instance prompt
    config = DataConfig(
        images=str(tmp_path), instance_prompt="portrait of [trigger]", caption_extension=".tags", **SMALL
    )
    assert prompts_by_name(build_dataset(config)) == {
        "a.png": ("sks, outdoors", False, 1),
        "b.png": ("portrait of sks", False, 1),
    }


def test_dataset_yaml(tmp_path: Path, make_image):
    for folder, count in (("me", 2), ("reg", 3)):
        (tmp_path / folder).mkdir()
        for number in range(count):
            make_image(32, 48, seed=number).save(tmp_path / folder / f"{folder}{number}.jpg")
    spec = tmp_path / "data.yaml"
    spec.write_text(
        "subsets:\n"
        "  - {images: me, repeats: 4, instance_prompt: 'a photo of [trigger] person', flip: 0.5}\n"
        "  - {images: reg, is_class: true, instance_prompt: 'a photo of a person', limit: 2}\n"
    )
    dataset = build_dataset(DataConfig(images=str(spec), token="ohwx", **SMALL))
    assert prompts_by_name(dataset) == {
        "me0.jpg": ("a photo of ohwx person", False, 4),
        "me1.jpg": ("a photo of ohwx person", False, 4),
        "reg0.jpg": ("a photo of a person", True, 1),
        "reg1.jpg": ("a photo of a person", True, 1),
    }
    assert [record.flip for record in dataset.records] == [0.5, 0.5, 0.0, 0.0]
    assert [dataset[i]["is_class"] for i in range(len(dataset))].count(True) == 2

    spec.write_text("subsets:\n  - {images: me, repeat: 4}\n")
    with pytest.raises(UserError, match="did you mean 'subsets\\[0\\].repeats'"):
        build_dataset(DataConfig(images=str(spec), **SMALL))
    spec.write_text("images: me\n")
    with pytest.raises(UserError, match="unknown key 'images'"):
        build_dataset(DataConfig(images=str(spec), **SMALL))


def test_class_dir(tmp_path: Path, make_image):
    for folder, count in (("me", 1), ("class", 4)):
        (tmp_path / folder).mkdir()
        for number in range(count):
            make_image(32, 32, seed=number).save(tmp_path / folder / f"{number}.png")
    config = DataConfig(
        images=str(tmp_path / "me"), class_word="dog", class_dir=str(tmp_path / "class"), num_class_images=3, **SMALL
    )
    dataset = build_dataset(config)
    assert [(r.prompt, r.is_class) for r in dataset.records] == [("a photo of sks dog", False)] + [
        ("a photo of dog", True)
    ] * 3
    short = build_dataset(DataConfig(**{**config.__dict__, "num_class_images": 6}))
    assert "ensure_class_images" in short.report.warnings[0]
    with pytest.raises(UserError, match="class_word"):
        build_dataset(DataConfig(**{**config.__dict__, "class_word": ""}))
    with pytest.raises(UserError, match="class_dir"):
        build_dataset(DataConfig(images=str(tmp_path / "me"), num_class_images=3))
    only_class = DataConfig(images=str(tmp_path / "empty"), class_dir=str(tmp_path / "class"), class_word="dog")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no usable training image"):
        build_dataset(only_class)


def test_files_that_train_nothing_are_named_in_the_summary(tmp_path):
    """notes.txt and a caption whose image is missing are reported, not silently passed over."""
    import shutil

    from personalize.data import DataConfig, build_dataset

    photos = tmp_path / "photos"
    photos.mkdir()
    source = sorted(Path(__file__).resolve().parents[2].joinpath("examples", "cat").glob("*.jpg"))[0]
    shutil.copy(source, photos / "a.jpg")
    (photos / "a.txt").write_text("a photo of sks cat on a sofa")
    (photos / "notes.txt").write_text("shot on my phone")
    (photos / "gone.caption").write_text("a caption whose image was deleted")
    dataset = build_dataset(DataConfig(images=str(photos), resolution=64))
    summary = dataset.report.summary()
    assert "notes.txt (not an image" in summary and "gone.caption (not an image" in summary
    assert "a.txt" not in summary and len(dataset) == 1
