"""The families of issue 27 on the flow-matching recipe (Flux Kontext, Chroma, Flux.2 dev / Klein), each
through the CLI on its tiny build: LoRA and LoKr, stock `load_lora_weights`, nf4, resume, detection."""

import copy
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main

from .conftest import CAT

FAMILIES = {"tiny-flux-kontext": "flux-kontext", "tiny-chroma": "chroma"}
MODELS = sorted(FAMILIES)


def _argv(model, out, cache_dir, *more):
    argv = ["train", "--images", str(CAT), "--model", model, "--steps", "2", "--output", str(out)]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1", "--set", "validation_images=1"]
    return [*argv, "--set", "checkpoint_every=0", *more]


def _images(pipe, seed=0):
    arguments = dict(num_inference_steps=2, height=64, width=64, output_type="pt")
    if "max_area" in inspect.signature(pipe.__call__).parameters:  # Flux Kontext sizes by area
        arguments["max_area"] = 64 * 64
    return pipe(prompt="a photo of sks cat", generator=torch.Generator().manual_seed(seed), **arguments).images


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_lora_and_lokr_train_through_the_cli_and_load(capsys, tmp_path, cache_dir, tiny_pipelines, model, method):
    from personalize.pipelines import load_adapter

    out = tmp_path / "run"
    assert main(_argv(model, out, cache_dir, "--method", method, "--rank", "4", "--lr", "5e-2")) == 0
    printed = capsys.readouterr().out
    assert f"{model} ({FAMILIES[model]})" in printed and "objective   flow matching" in printed
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2
    keys = load_file(str(out / "run.safetensors")).keys()
    assert keys and all(key.startswith("lora_transformer_") for key in keys)  # the single-file (ComfyUI) style
    assert ("lokr_w1" in " ".join(keys)) == (method == "lokr")
    pipe, base = copy.deepcopy(tiny_pipelines(model)), tiny_pipelines(model)
    load_adapter(pipe, out)
    with torch.no_grad():
        assert (_images(pipe) - _images(base)).abs().max() > 1e-3  # the adapter changes the image


@pytest.mark.parametrize("model", MODELS)
def test_stock_load_lora_weights_gives_our_loaders_images(quick, tiny_pipelines, model):
    from personalize.pipelines import load_adapter

    result = quick(model=model, method="lora", rank=4, lr=5e-2, steps=3, validation_images=0)
    ours, stock = copy.deepcopy(tiny_pipelines(model)), copy.deepcopy(tiny_pipelines(model))
    load_adapter(ours, result.output_dir)
    stock.load_lora_weights(str(result.output_dir))
    with torch.no_grad():
        torch.testing.assert_close(_images(ours), _images(stock), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_nf4_base_trains_on_cpu(quick, model):
    pytest.importorskip("bitsandbytes")
    result = quick(model=model, method="lora", rank=4, quantize="nf4", validation_images=0)
    assert result.metrics["steps"] == 2 and torch.isfinite(torch.tensor(result.metrics["final_loss"]))


@pytest.mark.parametrize("model", [pytest.param(name, marks=pytest.mark.slow) for name in MODELS])
def test_interrupted_run_resumes_to_the_same_adapter(quick, monkeypatch, tmp_path, model):
    from personalize.trainers.common import loop

    settings = dict(model=model, method="lokr", rank=4, steps=4, lr=1e-3, checkpoint_every=2, validation_images=0)
    uninterrupted = load_file(str(quick(**settings, output=str(tmp_path / "a")).output_dir / "a.safetensors"))
    save = loop.save_checkpoint

    def save_then_die(accelerator, state, root, keep):
        save(accelerator, state, root, keep)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        quick(**settings, output=str(tmp_path / "b"))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    resumed = load_file(str(quick(**settings, output=str(tmp_path / "b"), resume=True).output_dir / "b.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("model", MODELS)
def test_saved_folder_is_told_apart_by_its_pipeline(tmp_path, tiny_pipelines, model):
    from personalize.models import detect_family
    from personalize.models.families import described_family, family_of_config

    folder = tmp_path / model
    tiny_pipelines(model).save_pretrained(folder)
    assert detect_family(folder) == FAMILIES[model]
    assert described_family(str(folder)).name == FAMILIES[model]
    assert detect_family(tiny_pipelines(model)) == FAMILIES[model]
    config = dict(tiny_pipelines(model).transformer.config)
    assert family_of_config(config).name == ("flux" if model == "tiny-flux-kontext" else FAMILIES[model])
