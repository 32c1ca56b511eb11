"""The metric arithmetic of `personalize eval`, checked against values worked out by hand."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.errors import UserError
from personalize.eval import metrics
from personalize.eval.embedders import MEAN_STD, load_embedder, parse_metric_models, to_pixels
from personalize.eval.run import EvalImages, score


def test_similarity_to_references_by_hand():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    references = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # g1 = (1, 0): cos with (1, 0) = 1, with (1, 1)/sqrt2 = 1/sqrt2 -> mean (1 + 0.7071) / 2
    # g2 = (0, 1): cos 0 and 1/sqrt2 -> mean 0.3536
    expected = [(1 + 1 / math.sqrt(2)) / 2, (0 + 1 / math.sqrt(2)) / 2]
    assert metrics.similarity_to_references(generated, references).tolist() == pytest.approx(expected, abs=1e-6)


def test_paired_similarity_by_hand():
    first = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -5.0]])
    second = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert metrics.paired_similarity(first, second).tolist() == pytest.approx([1.0, 1 / math.sqrt(2), -1.0], abs=1e-6)
    with pytest.raises(ValueError):
        metrics.paired_similarity(first, second[:2])


def test_fallback_preprocessing_by_hand():
    # A 40 x 20 image, left half black, right half white: resized to 32 x 64 (shorter side 32),
    # the centre crop keeps columns 16..47 -> black left half, white right half.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 20:] = 255
    mean, std = MEAN_STD["dino"]
    pixels = to_pixels([Image.fromarray(array)], 32, mean, std)
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels[0, 0, 5, 2].item() == pytest.approx((0.0 - mean[0]) / std[0], abs=1e-4)
    assert pixels[0, 2, 5, 29].item() == pytest.approx((1.0 - mean[2]) / std[2], abs=1e-4)


def _image(colour, size=32):
    return Image.new("RGB", (size, size), colour)


def _cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_score_matches_a_hand_computation_on_tiny_models():
    dino, clip = load_embedder("dino", "tiny-dino"), load_embedder("clip", "tiny-clip")
    refs = [_image((200, 30, 30)), _image((30, 30, 200))]
    generated = [_image((190, 40, 40)), _image((20, 200, 20))]
    base, adapted = [_image((90, 90, 90))], [_image((250, 250, 0))]
    images = EvalImages(
        token="sks",
        class_word="ball",
        instance_prompt="a photo of sks ball",
        references=refs,
        subject={"a photo of sks ball": generated},
        base_class={"a photo of a ball": base},
        adapted_class={"a photo of a ball": adapted},
    )
    figures, rows = score(images, dino, clip)

    d_gen, d_ref = dino.images(generated).numpy(), dino.images(refs).numpy()
    expected_dino = np.mean([_cos(g, r) for g in d_gen for r in d_ref])
    c_gen, c_ref = clip.images(generated).numpy(), clip.images(refs).numpy()
    expected_clip_i = np.mean([_cos(g, r) for g in c_gen for r in c_ref])
    text = clip.texts(["a photo of ball"]).numpy()[0]  # the token is taken out of the prompt
    expected_clip_t = np.mean([_cos(g, text) for g in c_gen])
    expected_class = _cos(dino.images(base).numpy()[0], dino.images(adapted).numpy()[0])

    assert figures["dino"] == pytest.approx(expected_dino, abs=1e-5)
    assert figures["clip_i"] == pytest.approx(expected_clip_i, abs=1e-5)
    assert figures["clip_t"] == pytest.approx(expected_clip_t, abs=1e-5)
    assert figures["class_dino"] == pytest.approx(expected_class, abs=1e-5)
    assert figures["drift"] == pytest.approx(1 - expected_class, abs=1e-5)
    assert rows == [
        {
            "prompt": "a photo of sks ball",
            "dino": figures["dino"],
            "clip_i": figures["clip_i"],
            "clip_t": figures["clip_t"],
        }
    ]
    assert expected_class < 0.999  # the two class images differ, so drift is visible


def test_identical_images_score_one_and_no_drift():
    dino, clip = load_embedder("dino", "tiny-dino"), load_embedder("clip", "tiny-clip")
    photo = _image((10, 120, 200))
    images = EvalImages(
        "sks", "cup", "a sks cup", [photo], {"a sks cup": [photo, photo]}, {"a cup": [photo]}, {"a cup": [photo]}
    )
    figures, _ = score(images, dino, clip)
    assert figures["dino"] == pytest.approx(1.0, abs=1e-5)
    assert figures["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert figures["drift"] == pytest.approx(0.0, abs=1e-5)


def test_metric_model_flags():
    assert parse_metric_models(["dino=facebook/dino-vitb16", "clip=./clip"]) == {
        "dino": "facebook/dino-vitb16",
        "clip": "./clip",
    }
    for bad in ("dino", "sam=x", "clip="):
        with pytest.raises(UserError, match="dino=ID or clip=ID"):
            parse_metric_models([bad])
    with pytest.raises(UserError, match="not a clip model"):
        load_embedder("clip", "tiny-dino")
