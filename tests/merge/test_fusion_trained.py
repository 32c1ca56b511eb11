"""Two subjects trained through the CLI (`personalize train --method ed-lora` on two synthetic image sets),
then merged into one adapter by `personalize merge` with fusion, linear and cat: each trigger's output
(latents after 3 guided steps) is compared with what its own adapter gives for it.

Measured: after fusion each trigger is closer to its own subject's output than to the other subject's,
and closer than after plain linear merging of the same two or cat (their exact sum); the figures are printed.
Here the subjects live mostly in their tokens (the tiny preset's UNet lr 1e-3, token lr 1e-1); with a 10x
stronger UNet LoRA fusion still beats linear but not always cat (README, "Merging adapters")."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from merge_helpers import outputs
from PIL import Image, ImageDraw

from personalize.cli import main

SUBJECTS = {"<reddisk>": ((220, 30, 30), (255, 255, 255), "disk"), "<bluebars>": ((30, 60, 220), (0, 0, 0), "bars")}


def _images(folder, color, background, shape, count=4):
    """Synthetic photos of one subject: its shape and colors, moved and resized a little per image."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(shape))
    for index in range(count):
        image = Image.new("RGB", (64, 64), background)
        draw = ImageDraw.Draw(image)
        x, y, size = (int(v) for v in rng.integers([14, 14, 18], [26, 26, 26]))
        if shape == "disk":
            draw.ellipse([x, y, x + size, y + size], fill=color)
        else:
            for bar in range(0, 64, 12):
                draw.rectangle([bar + x % 6, 0, bar + x % 6 + 5, 63], fill=color)
        image.save(folder / f"{index}.png")


@pytest.mark.slow  # two training runs, three merges (about 3 minutes on a busy 2-core machine)
def test_fused_trained_subjects_keep_their_own_triggers(tmp_path, tiny_pipelines, monkeypatch, capsys):
    import personalize.models

    monkeypatch.setattr(personalize.models, "load_pipeline", lambda name, **_: copy.deepcopy(tiny_pipelines(name)))
    torch.set_num_threads(1)
    runs = {}
    for token, (color, background, shape) in SUBJECTS.items():
        images = tmp_path / "images" / token.strip("<>")
        _images(images, color, background, shape)
        runs[token] = tmp_path / "runs" / token.strip("<>")
        argv = ["train", "--images", str(images), "--preset", "tiny", "--method", "ed-lora", "--token", token]
        argv += ["--steps", "30", "--embedding-lr", "1e-1", "--output", str(runs[token])]
        argv += ["--set", "validation_images=0", "--set", "checkpoint_every=0", "--set", f"data.cache_dir={tmp_path}"]
        assert main(argv) == 0
    inputs = [str(runs[token]) for token in SUBJECTS]
    for method, rank in (("fusion", "8"), ("linear", None), ("cat", None)):
        argv = ["merge", *inputs, "--method", method, "--base", "tiny-sd15", "-o", str(tmp_path / method)]
        argv += ["--rank", rank, "--fusion-steps", "4"] if rank else []
        assert main(argv) == 0
    capsys.readouterr()

    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    tokens = list(SUBJECTS)
    own = {token: outputs(pipe, runs[token], [token])[token] for token in tokens}
    merged = {method: outputs(pipe, tmp_path / method, tokens) for method in ("fusion", "linear", "cat")}
    gap = {m: {t: float((merged[m][t] - own[t]).norm()) for t in tokens} for m in merged}
    to_other = {t: float((merged["fusion"][t] - own[o]).norm()) for t, o in (tokens, tokens[::-1])}
    with capsys.disabled():
        print(
            "\ndistance to the own adapter's output:",
            {m: {t: round(v, 4) for t, v in d.items()} for m, d in gap.items()},
        )
        print("fusion, distance to the other subject's output:", {t: round(v, 4) for t, v in to_other.items()})
    for token in tokens:
        assert gap["fusion"][token] < to_other[token], token
        assert gap["fusion"][token] < gap["linear"][token], token
    assert sum(gap["fusion"].values()) < sum(gap["cat"].values())
