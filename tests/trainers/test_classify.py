"""`personalize train --task classify` and `personalize predict` on tiny random CLIP / ViT models and a
synthetic few-shot task whose classes are separable (each class its own color, with noise)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from personalize.cli import main

COLORS = {"bird": (60, 70, 210), "cat": (200, 60, 50), "dog": (50, 180, 70)}


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for name, color in COLORS.items():
        (root / name).mkdir()
        for i in range(8):
            pixels = np.clip(np.array(color)[None, None] + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return root


def _train(pets, out, model, method, *extra):
    argv = ["train", "--task", "classify", "--images", str(pets), "--model", model, "--method", method]
    argv += ["--val-split", "0.5", "--output", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def test_coop_and_tip_adapter_beat_zero_shot_and_predict_prints_probabilities(pets, tmp_path, capsys):
    zero = _train(pets, tmp_path / "zs", "tiny-clip", "zero-shot")
    tip = _train(pets, tmp_path / "tip", "tiny-clip", "tip-adapter")
    coop = _train(pets, tmp_path / "coop", "tiny-clip", "coop", "--steps", "150", "--lr", "2e-2")
    assert zero["val_images"] == 12 and zero["chance"] == pytest.approx(1 / 3)
    assert tip["val_accuracy"] > zero["val_accuracy"] and tip["val_accuracy"] > 0.5
    assert coop["val_accuracy"] > zero["val_accuracy"] and coop["val_accuracy"] > 0.5
    assert coop["losses"][-1] < coop["losses"][0]
    assert coop["trainable_params"] == 4 * 32  # 4 context vectors of the text width
    out = tmp_path / "coop"
    assert {p.name for p in out.iterdir()} >= {"classifier.safetensors", "confusion.png", "README.md", "config.yaml"}
    assert Image.open(out / "confusion.png").size[0] > 100
    assert "held-out accuracy" in (out / "README.md").read_text()
    assert sum(map(sum, coop["confusion"])) == 12
    with safe_open(str(out / "classifier.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["head.ctx"]
    capsys.readouterr()
    images = [str(pets / "cat" / "0.png"), str(pets / "dog" / "1.png")]
    assert main(["predict", str(out), *images]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(images[0] + ": cat ") and lines[1].startswith(images[1] + ": dog ")
    probabilities = [float(part.split()[-1]) for part in lines[0].split(": ", 1)[1].split(", ")]
    assert sum(probabilities) == pytest.approx(1.0, abs=2e-3) and len(probabilities) == 3


@pytest.mark.parametrize(
    ("model", "method", "lr"),
    [
        ("tiny-vit", "vpt-deep", "5e-2"),
        pytest.param("tiny-clip", "lora", "1e-2", marks=pytest.mark.slow),
        pytest.param("tiny-clip", "clip-adapter", "1e-2", marks=pytest.mark.slow),
        pytest.param("tiny-clip", "tip-adapter-f", "1e-2", marks=pytest.mark.slow),
        pytest.param("tiny-vit", "vpt-shallow", "5e-2", marks=pytest.mark.slow),
        pytest.param("tiny-vit", "linear", "5e-2", marks=pytest.mark.slow),
        pytest.param("tiny-vit", "lora", "1e-2", marks=pytest.mark.slow),
        pytest.param("tiny-vit", "bitfit", "1e-2", marks=pytest.mark.slow),
        pytest.param("tiny-clip", "bitfit", "1e-2", marks=pytest.mark.slow),
    ],
)
def test_each_method_beats_chance_and_reloads(pets, tmp_path, capsys, model, method, lr):
    metrics = _train(pets, tmp_path / "out", model, method, "--steps", "60", "--lr", lr)
    assert metrics["val_accuracy"] > metrics["chance"] + 0.15, metrics["val_accuracy"]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "out"), str(pets / "bird" / "0.png")]) == 0
    assert capsys.readouterr().out.startswith(str(pets / "bird" / "0.png") + ": ")


def test_bad_input_is_one_line_and_exit_2(pets, tmp_path, capsys):
    (tmp_path / "one" / "cat").mkdir(parents=True)
    assert main(["train", "--task", "classify", "--images", str(tmp_path / "one")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["train", "--task", "classify", "--images", str(pets), "--model", "tiny-vit", "--method", "coop"]) == 2
    assert "needs a CLIP model" in capsys.readouterr().err
    assert main(["train", "--task", "segment", "--images", str(pets)]) == 2
    assert main(["predict", str(tmp_path), str(pets / "cat" / "0.png")]) == 2
    assert "classifier.safetensors" in capsys.readouterr().err
