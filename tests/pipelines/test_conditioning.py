"""Composition at inference: a personalization LoRA together with a ControlNet, T2I-Adapter or IP-Adapter."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.cli import main
from personalize.images import read_png_settings
from personalize.pipelines import compose
from personalize.pipelines.generate import GenerationSettings, generate

CAT = Path(__file__).resolve().parents[2] / "examples" / "cat"
KINDS = {
    "controlnet": ("controlnet", "control_image"),
    "t2i-adapter": ("t2i_adapter", "adapter_image"),
    "ip-adapter": ("ip_adapter", "ip_image"),
}


@pytest.fixture(scope="module")
def runs(tiny_pipelines, tmp_path_factory):
    """One-step runs on tiny-sd15: a LoRA and each conditioning adapter (large lr: visible effects)."""
    from personalize.trainers import train

    root = tmp_path_factory.mktemp("conditioning-runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    outputs = {}
    for method in ["lora", *KINDS]:
        result = train(
            pipe=copy.deepcopy(tiny_pipelines("tiny-sd15")),
            images=str(CAT),
            model="tiny-sd15",
            method=method,
            steps=1,
            lr=1e-2,
            resolution=64,
            num_workers=0,
            validation_steps=1,
            validation_images=1,
            checkpoint_every=0,
            output=str(root / method),
        )
        outputs[method] = result.output_dir
    torch.set_num_threads(before)
    image = root / "edges.png"
    Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 8).astype(np.uint8) * 255).convert("RGB").save(image)
    outputs["image"] = image
    return outputs


def _generate(pipe, arguments):
    settings = GenerationSettings(prompt="a cat", steps=2, width=64, height=64, extra=arguments)
    return np.asarray(generate(pipe, settings)[0], dtype=np.float32)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_lora_composes_with_each_conditioning_adapter(tiny_pipelines, runs, kind):
    from personalize.pipelines import load_adapter

    flag, image_flag = KINDS[kind]
    options = {flag: str(runs[kind]), image_flag: str(runs["image"])}
    plain_pipe, arguments = compose(copy.deepcopy(tiny_pipelines("tiny-sd15")), **options)
    plain = _generate(plain_pipe, arguments)
    personalized = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    load_adapter(personalized, str(runs["lora"]), scale=1.0)
    pipe, arguments = compose(personalized, **options)
    assert any(type(module).__name__ == "AdapterLayer" for module in pipe.unet.modules())  # the LoRA came along
    both = _generate(pipe, arguments)
    assert both.shape == (64, 64, 3)
    assert np.abs(both - plain).max() > 0  # the LoRA changes the conditioned image
    base = _generate(copy.deepcopy(tiny_pipelines("tiny-sd15")), {})
    assert np.abs(plain - base).max() > 0  # and so does the conditioning adapter


def test_generate_cli_composes_adapter_controlnet_and_ip_adapter(runs, tmp_path):
    out = tmp_path / "cat.png"
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "a cat", "--steps", "2", "--output", str(out)]
    argv += ["--adapter", str(runs["lora"]), "--controlnet", str(runs["controlnet"])]
    argv += ["--control-image", str(runs["image"]), "--control-scale", "0.5"]
    argv += ["--ip-adapter", str(runs["ip-adapter"] / "ip_adapter.safetensors"), "--ip-image", str(runs["image"])]
    assert main(argv) == 0
    settings = read_png_settings(out)
    assert settings["controlnet"] == str(runs["controlnet"]) and settings["control_scale"] == 0.5
    assert settings["ip_adapter"].endswith("ip_adapter.safetensors") and settings["adapters"]


def test_generate_cli_conditioning_errors_are_one_line(runs, tmp_path, capsys):
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "a cat", "--steps", "1", "--output", str(tmp_path)]
    assert main([*argv, "--controlnet", str(runs["controlnet"])]) == 2
    assert "--controlnet needs --control-image" in capsys.readouterr().err
    both = ["--controlnet", str(runs["controlnet"]), "--control-image", str(runs["image"])]
    both += ["--t2i-adapter", str(runs["t2i-adapter"]), "--adapter-image", str(runs["image"])]
    assert main([*argv, *both]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main([*argv, "--controlnet", str(tmp_path), "--control-image", str(runs["image"])]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.slow  # each training run above already samples through compose (SDXL too, in tests/trainers)
def test_sdxl_controlnet_and_ip_adapter_compose(tiny_pipelines, tmp_path):
    from personalize.trainers import train

    outputs = {}
    for method in ("controlnet", "ip-adapter"):
        outputs[method] = train(
            pipe=copy.deepcopy(tiny_pipelines("tiny-sdxl")),
            images=str(CAT),
            model="tiny-sdxl",
            method=method,
            steps=1,
            resolution=64,
            num_workers=0,
            validation_steps=1,
            validation_images=1,
            checkpoint_every=0,
            output=str(tmp_path / method),
        ).output_dir
    image = tmp_path / "gray.png"
    Image.new("RGB", (64, 64), "gray").save(image)
    pipe, arguments = compose(
        copy.deepcopy(tiny_pipelines("tiny-sdxl")),
        controlnet=str(outputs["controlnet"]),
        control_image=str(image),
        ip_adapter=str(outputs["ip-adapter"]),
        ip_image=str(image),
    )
    assert type(pipe).__name__ == "StableDiffusionXLControlNetPipeline"
    assert _generate(pipe, arguments).shape == (64, 64, 3)
