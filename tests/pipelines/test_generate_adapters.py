"""`personalize generate --adapter PATH[:SCALE] --quantize nf4`, and adapters read from files."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import latents, pipeline_copy, random_components
from safetensors.torch import save_file

import personalize.models
from personalize.cli import main
from personalize.images import read_png_settings
from personalize.pipelines import load_adapter, loaded_adapters
from personalize.pipelines.cli import QUANTIZE_CHOICES, parse_adapter


def save_canonical(components, path):
    """A canonical adapter file: keys "<component>.<module path>.<param>"."""
    flat = {f"{part}.{key}": v.contiguous() for part, tensors in components.items() for key, v in tensors.items()}
    save_file(flat, str(path), metadata={"made_by": "test"})
    return path


@pytest.fixture
def cached_models(monkeypatch, tiny_pipelines):
    """`--model tiny-*` resolves to a copy of the session's pipeline instead of building it again."""
    monkeypatch.setattr(personalize.models, "load_pipeline", lambda name, **_: copy.deepcopy(tiny_pipelines(name)))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_parse_adapter(tmp_path):
    assert parse_adapter("out/cat") == ("out/cat", 1.0)
    assert parse_adapter("out/cat:0.6") == ("out/cat", 0.6)
    assert parse_adapter("style.safetensors:-1") == ("style.safetensors", -1.0)
    odd = tmp_path / "a:2"
    odd.write_bytes(b"")
    assert parse_adapter(str(odd)) == (str(odd), 1.0)
    assert parse_adapter("c:/x/y:z") == ("c:/x/y:z", 1.0)


def test_quantize_choices_are_the_core_modes():
    from personalize.adapters import QUANT_MODES

    assert QUANTIZE_CHOICES == QUANT_MODES


def test_canonical_file_loads_like_the_component_dict(tiny_pipelines, tmp_path):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    components = random_components(pipe, "loha", std=0.5, rank=2)
    path = save_canonical(components, tmp_path / "style_loha.safetensors")
    assert load_adapter(pipe, path, scale=0.5) == "style_loha"
    assert loaded_adapters(pipe)["style_loha"].source == str(path)
    from_file = latents(pipe)
    other = pipeline_copy(tiny_pipelines, "tiny-sd15")
    load_adapter(other, components, scale=0.5)
    assert torch.equal(from_file, latents(other))


def test_generate_with_two_adapters_reproduces_and_records_them(tmp_path, capsys, cached_models, tiny_pipelines):
    pipe = tiny_pipelines("tiny-sd15")
    first = save_canonical(random_components(pipe, "lora", std=0.3, rank=4, seed=1), tmp_path / "cat.safetensors")
    second = save_canonical(random_components(pipe, "lokr", std=0.5, factor=4, seed=2), tmp_path / "style.safetensors")
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "a photo of a cat", "--steps", "2", "--seed", "3"]
    with_adapters = [*argv, "--adapter", f"{first}:0.5", "--adapter", str(second)]
    assert main([*with_adapters, "--output", str(tmp_path / "one.png")]) == 0
    assert main([*with_adapters, "--output", str(tmp_path / "two.png")]) == 0
    assert main([*argv, "--output", str(tmp_path / "base.png")]) == 0
    assert np.array_equal(pixels(tmp_path / "one.png"), pixels(tmp_path / "two.png"))
    assert not np.array_equal(pixels(tmp_path / "one.png"), pixels(tmp_path / "base.png"))
    recorded = read_png_settings(tmp_path / "one.png")
    assert recorded["adapters"] == [
        {"path": str(first), "scale": 0.5, "name": "cat"},
        {"path": str(second), "scale": 1.0, "name": "style"},
    ]
    assert recorded["seed"] == 3 and "adapters" not in read_png_settings(tmp_path / "base.png")
    parameters = Image.open(tmp_path / "one.png").text["parameters"]  # what A1111 shows and re-applies
    assert parameters.splitlines()[0] == "a photo of a cat <lora:cat:0.5> <lora:style:1>"
    assert capsys.readouterr().out.split()[0].endswith("one.png")


@pytest.mark.slow  # test_quantized covers the 4-bit path; this adds the CLI flag
def test_generate_on_a_4bit_unet_with_an_adapter(tmp_path, cached_models, tiny_pipelines):
    pytest.importorskip("bitsandbytes")
    adapter = save_canonical(
        random_components(tiny_pipelines("tiny-sd15"), "lora", ("unet",), std=0.3, rank=4), tmp_path / "cat.safetensors"
    )
    out = tmp_path / "q.png"
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "a cat", "--steps", "1", "--quantize", "nf4"]
    assert main([*argv, "--adapter", f"{adapter}:0.8", "--output", str(out)]) == 0
    settings = read_png_settings(out)
    assert settings["quantize"] == "nf4" and settings["adapters"][0]["scale"] == 0.8


def test_generate_with_a_missing_or_foreign_adapter_is_a_user_error(tmp_path, capsys, cached_models, tiny_pipelines):
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "x", "--steps", "1", "--output", str(tmp_path)]
    assert main([*argv, "--adapter", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    xl = random_components(tiny_pipelines("tiny-sdxl"), "lora", ("unet", "text_encoder_2"), rank=2)
    assert main([*argv, "--adapter", str(save_canonical(xl, tmp_path / "xl.safetensors"))]) == 2
    error = capsys.readouterr().err
    assert "text_encoder_2" in error or "another model family" in error
    assert not list(tmp_path.glob("*.png"))
