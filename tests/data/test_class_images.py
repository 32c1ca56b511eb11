"""Class images are generated once, resumed without redoing work, and carry their prompt."""

import numpy as np
from PIL import Image

from personalize.data import ensure_class_images
from personalize.images import read_png_settings


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generation_resumes(tmp_path, tiny_pipelines):
    pipe = tiny_pipelines("tiny-sd15")
    folder = tmp_path / "class"
    paths = ensure_class_images(pipe, "a photo of cat", folder, count=3, batch_size=2, seed=5, num_inference_steps=2)
    assert [path.name for path in paths] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert read_png_settings(paths[1])["prompt"] == "a photo of cat"
    assert read_png_settings(paths[1])["seed"] == 6
    original = pixels(paths[1])
    stamps = {path.name: path.stat().st_mtime_ns for path in paths}

    paths[1].unlink()  # an interrupted run lost one image
    again = ensure_class_images(pipe, "a photo of cat", folder, count=3, batch_size=2, seed=5, num_inference_steps=2)
    assert [path.name for path in again] == [path.name for path in paths]
    # same seed -> the same image (up to float noise of batch size 1 vs 2)
    assert np.abs(pixels(again[1]) - original).max() <= 2
    assert {path.name: path.stat().st_mtime_ns for path in again if path.name != "class-00001.png"} == {
        name: stamp for name, stamp in stamps.items() if name != "class-00001.png"
    }

    more = ensure_class_images(pipe, "a photo of cat", folder, count=4, batch_size=2, seed=5, num_inference_steps=2)
    assert len(more) == 4 and more[3].name == "class-00003.png"
    assert ensure_class_images(pipe, "a photo of cat", folder, count=2) == more[:2]  # enough: nothing runs
