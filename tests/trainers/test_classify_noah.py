"""NOAH's per-block search among Adapter / LoRA / VPT, and bottleneck adapters, for `--task classify`
on the tiny random ViT and the synthetic color task of test_classify.py."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open

from personalize.cli import main

from .test_classify import _train, pets  # noqa: F401  (the module's fixture)


def test_weight_entangled_subnets_share_the_leading_slices():
    from personalize.trainers.vision import noah
    from personalize.trainers.vision.backbone import load_backbone

    backbone = load_backbone("tiny-vit")
    supernet = noah.Noah(backbone, 9, 9, 10)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in supernet.blocks:  # the zero-initialized halves, made non-zero
            block.lora_b.normal_(0, 0.1)
            block.up.normal_(0, 0.1)
    off = [{"lora": 0, "adapter": 0, "vpt": 0}] * len(supernet.blocks)
    supernet.set_config(off)
    with torch.no_grad():
        plain = backbone.image_features(pixels)
    supernet.remove()
    with torch.no_grad():
        assert torch.equal(backbone.image_features(pixels), plain)  # every module off = the frozen ViT
    # a small subnet of the supernet computes what a subnet built at that size computes with the same slices
    supernet = noah.Noah(backbone, 9, 9, 10)
    chosen = [{"lora": 5, "adapter": 1, "vpt": 0}, {"lora": 0, "adapter": 9, "vpt": 5}] + off[2:]
    with torch.no_grad():
        for block in supernet.blocks:
            block.lora_b.normal_(0, 0.1)
            block.up.normal_(0, 0.1)
            block.prompts.normal_()
    supernet.set_config(chosen)
    with torch.no_grad():
        big = backbone.image_features(pixels)
    supernet.remove()
    small = noah.Noah(backbone, *([c[key] for c in chosen] for key in ("lora", "adapter", "vpt")))
    with torch.no_grad():
        for src, dst, choice in zip(supernet.blocks, small.blocks, chosen, strict=True):
            r, d, p = choice["lora"], choice["adapter"], choice["vpt"]
            dst.lora_a.copy_(src.lora_a[:, :r])
            dst.lora_b.copy_(src.lora_b[:, :, :r])
            dst.down.copy_(src.down[:d])
            dst.down_bias.copy_(src.down_bias[:d])
            dst.up.copy_(src.up[:, :d])
            dst.prompts.copy_(src.prompts[:p])
        assert torch.allclose(backbone.image_features(pixels), big, atol=1e-5)
        assert not torch.allclose(big, plain, atol=1e-3)
    small.remove()
    assert noah.config_params(chosen, 32) == 4 * 5 * 32 + (2 * 32 + 1) * 10 + 5 * 32


def test_the_search_finds_the_best_configuration_of_a_known_score():
    """An evolutionary search on a score with a known optimum (LoRA 5 everywhere, nothing else) finds it."""
    from personalize.trainers.vision import noah

    class Blocks:
        blocks = [None] * 3

    opts = noah.options({"population": 30, "generations": 10, "vpt_tokens": [0, 5]})
    target = [{"lora": 5, "adapter": 0, "vpt": 0}] * 3

    def score(config):  # the share of right choices: smooth, as accuracy is over neighbouring configurations
        return sum(c[key] == t[key] for c, t in zip(config, target, strict=True) for key in t) / 9

    for seed in range(4):  # 2^3 x 4^6 = 32768 configurations; the search scores ~200
        best, accuracy, scored = noah.search(Blocks(), score, opts, 32, seed=seed)
        assert best == target and accuracy == 1.0 and 30 < scored < 330
    budget = noah.options({"max_params": 700, "population": 30, "generations": 10, "vpt_tokens": [0, 5]})
    small, accuracy, _ = noah.search(Blocks(), score, budget, 32, seed=0)
    assert noah.config_params(small, 32) <= 700 < noah.config_params(target, 32)  # LoRA 5 is 640 per block
    assert accuracy == 7 / 9  # the best within the budget: LoRA 5 in one block, everything else off


def test_noah_on_the_vit_beats_chance_writes_its_config_and_reloads(pets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "noah"
    options = '{"population": 6, "generations": 1, "lora_ranks": [0, 2], "adapter_dims": [0, 2], "vpt_tokens": [0, 2]}'
    metrics = _train(
        pets, out, "tiny-vit", "noah", "--steps", "40", "--lr", "5e-2", "--set", f"method_options={options}"
    )
    assert metrics["val_accuracy"] > metrics["chance"] + 0.15, metrics["val_accuracy"]
    chosen = metrics["noah_config"]
    assert len(chosen) == 5 and all(set(block) == {"lora", "adapter", "vpt"} for block in chosen)
    assert 6 <= metrics["noah_configs_scored"] <= 12
    card = (out / "README.md").read_text()
    assert "NOAH configuration" in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[1:] for row in rows] == [
        [str(b["lora"]), str(b["adapter"]), str(b["vpt"]) + " |"] for b in chosen
    ]
    with safe_open(str(out / "classifier.safetensors"), framework="pt") as handle:
        info = json.loads(handle.metadata()["personalize"])
        assert info["method_options"]["config"] == chosen
        width = {key: handle.get_tensor(key).shape for key in handle.keys()}  # noqa: SIM118
    assert width["extra.blocks.0.lora_a"][1] == chosen[0]["lora"]  # the chosen sizes only
    capsys.readouterr()
    assert main(["predict", str(out), str(pets / "dog" / "0.png")]) == 0
    assert capsys.readouterr().out.startswith(str(pets / "dog" / "0.png") + ": ")
    # a given configuration skips the search and trains it
    given = json.dumps({"config": chosen})
    again = _train(pets, tmp_path / "given", "tiny-vit", "noah", "--steps", "5", "--set", f"method_options={given}")
    assert again["noah_config"] == chosen and "noah_configs_scored" not in again


def test_noah_bad_options_are_one_line(pets, tmp_path, capsys):  # noqa: F811
    argv = ["train", "--task", "classify", "--images", str(pets), "--model", "tiny-vit", "--method", "noah"]
    assert main([*argv, "--set", "method_options={lora_ranks: [-1]}", "--output", str(tmp_path / "a")]) == 2
    assert "lora_ranks" in capsys.readouterr().err
    assert main([*argv, "--set", "method_options={config: [1, 2]}", "--output", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "5 blocks" in error


@pytest.mark.parametrize(
    ("model", "method"),
    [("tiny-vit", "houlsby"), pytest.param("tiny-vit", "pfeiffer", marks=pytest.mark.slow)],
)
def test_bottleneck_adapters_on_the_vit_beat_chance_and_reload(pets, tmp_path, capsys, model, method):  # noqa: F811
    metrics = _train(pets, tmp_path / "out", model, method, "--steps", "60", "--lr", "5e-2")
    assert metrics["val_accuracy"] > metrics["chance"] + 0.15, metrics["val_accuracy"]
    per_layer = 2 if method == "houlsby" else 1
    with safe_open(str(tmp_path / "out" / "classifier.safetensors"), framework="pt") as handle:
        keys = [key for key in handle.keys() if key.endswith("adapter_up.weight")]  # noqa: SIM118
    assert len(keys) == 5 * per_layer  # after attention.o_proj and mlp.fc2 (houlsby) / fc2 only (pfeiffer)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "out"), str(pets / "cat" / "0.png")]) == 0
    assert capsys.readouterr().out.startswith(str(pets / "cat" / "0.png") + ": ")


def test_random_configurations_cover_the_space():
    from personalize.trainers.vision import noah

    space = {"lora": [0, 1], "adapter": [0, 1], "vpt": [0, 1]}
    seen = {repr(noah.random_config(space, 1, random.Random(seed))) for seed in range(200)}
    assert len(seen) == 8
