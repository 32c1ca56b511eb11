"""The flow-matching recipe (SD3, Flux) end to end on tiny-flux and tiny-sd3: CLI, Python API, stock loaders."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main

from .conftest import CAT, assert_resume_reproduces, one_line_error

METHODS = ["lora", "dora", "loha", "lokr", "krona", "ia3", "full"]
QUICK = {("lora", "tiny-flux"), ("lora", "tiny-sd3"), ("full", "tiny-flux"), ("lokr", "tiny-sd3")}  # the rest: slow


def _matrix(pairs):
    """pytest params; pairs outside QUICK run with the slow tests (the default run stays short)."""
    return [pytest.param(*pair, marks=() if pair in QUICK else pytest.mark.slow) for pair in pairs]


KRONA = ["--set", "method_options={a1: 4, a2: 4}"]  # the paper's a1=64 does not divide the tiny width of 32


def _argv(model, out, cache_dir, *more):
    argv = ["train", "--images", str(CAT), "--model", model, "--steps", "2", "--resolution", "32"]
    argv += ["--output", str(out), "--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1"]
    return [*argv, "--set", "validation_images=1", "--set", "checkpoint_every=0", *more]


@pytest.mark.parametrize(
    ("method", "model"), _matrix([(m, model) for m in METHODS for model in ("tiny-flux", "tiny-sd3")])
)
def test_every_method_trains_through_the_cli(capsys, tmp_path, cache_dir, model, method):
    out = tmp_path / "run"
    more = ["--method", method, "--rank", "4", *(KRONA if method == "krona" else [])]
    assert main(_argv(model, out, cache_dir, *more)) == 0
    printed = capsys.readouterr().out
    family = "flux" if model == "tiny-flux" else "sd3"
    assert f"{model} ({family})" in printed and "objective   flow matching" in printed
    written = {path.name for path in out.iterdir()}
    assert {"config.yaml", "README.md", "metrics.json", "samples"} <= written
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2
    if method == "full":
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
        return
    assert "run.safetensors" in written
    assert ("pytorch_lora_weights.safetensors" in written) == (method in ("lora", "dora"))
    keys = load_file(str(out / "run.safetensors")).keys()
    assert keys and all(key.startswith("lora_transformer_") for key in keys)  # the single-file (ComfyUI) style


def _images(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of sks cat", num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt")


@pytest.mark.parametrize(
    ("method", "model"), _matrix([(m, model) for m in ("lora", "dora") for model in ("tiny-flux", "tiny-sd3")])
)
def test_stock_load_lora_weights_gives_our_loaders_images(quick, tiny_pipelines, model, method):
    from personalize.pipelines import load_adapter

    result = quick(model=model, method=method, rank=4, lr=5e-2, steps=3, resolution=32, train_text_encoder=True)
    ours, stock, base = (copy.deepcopy(tiny_pipelines(model)) for _ in range(3))
    load_adapter(ours, result.output_dir)
    stock.load_lora_weights(str(result.output_dir))
    with torch.no_grad():
        mine, theirs, plain = _images(ours).images, _images(stock).images, _images(base).images
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (mine - plain).abs().max() > 1e-3  # the adapter changes the image


@pytest.mark.parametrize(
    "method", ["lokr", pytest.param("loha", marks=pytest.mark.slow), pytest.param("krona", marks=pytest.mark.slow)]
)
def test_lycoris_outputs_load_into_stock_pipelines_with_load_adapter(quick, tiny_pipelines, method):
    from personalize import adapters
    from personalize.pipelines import load_adapter

    options = {"method_options": {"a1": 4, "a2": 4}} if method == "krona" else {"rank": 4}
    result = quick(model="tiny-flux", method=method, lr=5e-2, steps=3, resolution=32, **options)
    pipe, base = copy.deepcopy(tiny_pipelines("tiny-flux")), copy.deepcopy(tiny_pipelines("tiny-flux"))
    load_adapter(pipe, result.output_dir, name="subject")
    written = load_file(str(result.output_dir / "out.safetensors"))
    loaded = adapters.state_dict(pipe.transformer, "subject")
    assert len(loaded) == len(written)
    with torch.no_grad():
        assert (_images(pipe).images - _images(base).images).abs().max() > 1e-3


def test_prior_preservation_trains_instance_and_class_rows(quick, monkeypatch, tmp_path):
    from personalize.trainers.diffusion import losses

    seen = []
    combine = losses.combine

    def spy(per_sample, weights=None, is_class=None, prior_weight=1.0):
        seen.append(is_class.tolist())
        return combine(per_sample, weights, is_class, prior_weight)

    monkeypatch.setattr(losses, "combine", spy)
    class_dir = tmp_path / "class"
    quick(
        model="tiny-flux",
        method="lora",
        rank=4,
        resolution=32,
        prior_preservation=True,
        class_dir=str(class_dir),
        num_class_images=2,
        class_image_steps=2,
    )
    assert sorted(path.name for path in class_dir.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert seen == [[False, True], [False, True]]


def test_nf4_base_trains_on_cpu(quick):
    pytest.importorskip("bitsandbytes")
    result = quick(model="tiny-flux", method="lokr", rank=4, resolution=32, quantize="nf4", validation_images=0)
    assert result.metrics["steps"] == 2 and torch.isfinite(torch.tensor(result.metrics["final_loss"]))


def test_interrupted_run_resumes_to_the_same_adapter(quick, monkeypatch, tmp_path):
    settings = dict(model="tiny-sd3", method="lora", rank=4, steps=4, lr=1e-3, resolution=32, checkpoint_every=2)
    settings.update(validation_images=0, lr_scheduler="cosine", ema=True)
    assert_resume_reproduces(quick, monkeypatch, tmp_path, **settings)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, cache_dir):
    from personalize.models import build_tiny

    out = tmp_path / "out"
    assert "multiple of 2" in one_line_error(capsys, _argv("tiny-flux", out, cache_dir, "--resolution", "33"))
    error = one_line_error(capsys, _argv("tiny-sd3", out, cache_dir, "--method", "bitfit"))
    assert "bitfit" in error and "lora" in error
    folder = tmp_path / "schnell"
    build_tiny("tiny-flux").save_pretrained(folder)
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "guidance_embeds": False}))  # schnell
    capsys.readouterr()
    assert "schnell" in one_line_error(capsys, _argv(str(folder), out, cache_dir))
    assert not out.exists()
