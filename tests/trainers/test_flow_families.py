"""Qwen-Image, Qwen-Image 2.1, Z-Image, HiDream-I1 and Krea 2 through the flow-matching recipe: CLI, Python API,
stock loaders.

Default run: LoRA through the CLI and the stock-loader comparison per family (a few seconds each); LoKr,
nf4, resume and the wider matrix run with the slow tests.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main

from .conftest import CAT, assert_resume_reproduces

FAMILIES = {
    "tiny-qwen-image": "qwen-image",
    "tiny-qwen-image21": "qwen-image-21",
    "tiny-z-image": "z-image",
    "tiny-hidream": "hidream",
    "tiny-krea2": "krea2",
}
SINGLE_FILE_PREFIX = {name: "lycoris_" for name in FAMILIES}  # the key style ComfyUI maps for them


def _argv(model, out, cache_dir, *more):
    argv = ["train", "--images", str(CAT), "--model", model, "--steps", "2", "--resolution", "32"]
    argv += ["--output", str(out), "--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1"]
    return [*argv, "--set", "validation_images=1", "--set", "checkpoint_every=0", *more]


QUICK = {"tiny-qwen-image", "tiny-z-image"}  # CLI runs in the default run; all four train through the API there


@pytest.mark.parametrize(
    ("model", "method"),
    [
        pytest.param(model, method, marks=() if (model in QUICK and method == "lora") else pytest.mark.slow)
        for method in ("lora", "lokr")
        for model in FAMILIES
    ],
)
def test_lora_and_lokr_train_through_the_cli(capsys, tmp_path, cache_dir, model, method):
    out = tmp_path / "run"
    assert main(_argv(model, out, cache_dir, "--method", method, "--rank", "4")) == 0
    printed = capsys.readouterr().out
    assert f"{model} ({FAMILIES[model]})" in printed and "objective   flow matching, weighting none" in printed
    losses = json.loads((out / "metrics.json").read_text())["losses"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "samples" / "step-000002.png").is_file()
    assert ("pytorch_lora_weights.safetensors" in {p.name for p in out.iterdir()}) == (method == "lora")
    keys = load_file(str(out / "run.safetensors")).keys()
    assert keys and all(key.startswith(SINGLE_FILE_PREFIX[model]) for key in keys)  # the single-file style


def _images(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of sks cat", num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt")


@pytest.mark.parametrize("model", list(FAMILIES))
def test_stock_load_lora_weights_gives_our_loaders_images(quick, tiny_pipelines, model):
    from personalize.pipelines import load_adapter

    result = quick(model=model, method="lora", rank=4, lr=5e-2, steps=3, resolution=32, validation_images=0)
    ours, stock, base = (copy.deepcopy(tiny_pipelines(model)) for _ in range(3))
    load_adapter(ours, result.output_dir)
    stock.load_lora_weights(str(result.output_dir))  # <Family>Pipeline's own LoRA loader mixin
    with torch.no_grad():
        mine, theirs, plain = _images(ours).images, _images(stock).images, _images(base).images
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (mine - plain).abs().max() > 1e-3  # the adapter changes the image


@pytest.mark.slow
@pytest.mark.parametrize("model", list(FAMILIES))
def test_lokr_loads_into_the_stock_pipeline_with_load_adapter(quick, tiny_pipelines, model):
    from personalize import adapters
    from personalize.pipelines import load_adapter

    result = quick(model=model, method="lokr", rank=4, lr=5e-2, steps=3, resolution=32, validation_images=0)
    pipe, base = copy.deepcopy(tiny_pipelines(model)), copy.deepcopy(tiny_pipelines(model))
    load_adapter(pipe, result.output_dir, name="subject")
    assert len(adapters.state_dict(pipe.transformer, "subject")) == len(
        load_file(str(result.output_dir / "out.safetensors"))
    )
    with torch.no_grad():
        assert (_images(pipe).images - _images(base).images).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("model", list(FAMILIES))
def test_nf4_base_trains_on_cpu(quick, model):
    pytest.importorskip("bitsandbytes")
    result = quick(model=model, method="lora", rank=4, resolution=32, quantize="nf4", validation_images=0)
    assert result.metrics["steps"] == 2 and torch.isfinite(torch.tensor(result.metrics["final_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("model", list(FAMILIES))
def test_interrupted_run_resumes_to_the_same_adapter(quick, monkeypatch, tmp_path, model):
    settings = dict(model=model, method="lora", rank=4, steps=4, lr=1e-3, resolution=32, checkpoint_every=2)
    assert_resume_reproduces(quick, monkeypatch, tmp_path, **settings, validation_images=0)


def test_a_dit_family_without_a_description_is_one_line_naming_the_nearest(capsys, tmp_path, cache_dir):
    from diffusers import Lumina2Transformer2DModel

    folder = tmp_path / "lumina2"
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=8,
        num_layers=1,
        num_attention_heads=1,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=8,
    )
    transformer.save_config(folder / "transformer")  # the configs are all the check reads; no weights
    index = {"_class_name": "Lumina2Pipeline", "transformer": ["diffusers", "Lumina2Transformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert main(_argv(str(folder), out, cache_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Lumina2 model (Lumina2Pipeline" in err and "nearest supported family is z-image" in err
    assert not out.exists()


@pytest.mark.parametrize("model", list(FAMILIES))
def test_a_saved_tiny_family_reloads_with_stock_from_pretrained_and_is_detected(tmp_path, model):
    from diffusers import DiffusionPipeline

    from personalize.models import detect_family, save_tiny
    from personalize.models.families import described_family

    folder = save_tiny(model, tmp_path / model)
    assert detect_family(folder) == FAMILIES[model] and described_family(str(folder)).name == FAMILIES[model]
    reloaded = DiffusionPipeline.from_pretrained(folder)
    assert type(reloaded).__name__ == described_family(str(folder)).pipeline_class


def _stock_call(model, pipe):
    """(latents (1, C, h, w), timestep in [0, 1000], the stock prediction in latent layout) of the second-step
    transformer call of the stock pipeline at 32 px (8 x 8 latents), read back in each family's own layout."""
    from personalize.models.families.flux import unpack

    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args, kwargs, output[0])), with_kwargs=True
    )
    no_cfg = {"tiny-krea2": 0.0, "tiny-hidream": 1.0, "tiny-z-image": 1.0}  # one conditional call per step
    arguments = {"guidance_scale": no_cfg[model]} if model in no_cfg else {}
    with torch.no_grad():
        pipe(
            "a photo of sks cat",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **arguments,
        )
    hook.remove()
    args, kwargs, output = calls[-1]  # the second step: a timestep inside (0, 1000)
    if model in ("tiny-qwen-image", "tiny-krea2"):  # packed 2x2 tokens, t / 1000
        return unpack(kwargs["hidden_states"], 4, 4), kwargs["timestep"] * 1000, unpack(output, 4, 4)
    if model == "tiny-qwen-image21":  # unpatched 16x latents (2 x 2), one token each after the text; t / 1000

        def grid(tokens):
            return tokens[:, -4:].transpose(1, 2).reshape(1, -1, 2, 2)

        return grid(kwargs["hidden_states"]), kwargs["timestep"] * 1000, grid(output)
    if model == "tiny-z-image":  # lists of (C, 1, h, w), (1000 - t) / 1000, negated output
        images, times, predictions = args[0][:1], args[1][:1], output[:1]  # the conditional half (CFG batch)
        return torch.stack(images).squeeze(2), 1000 - times * 1000, -torch.stack(predictions).squeeze(2)
    return kwargs["hidden_states"], kwargs["timesteps"], -output  # HiDream: raw t, negated output


@pytest.mark.parametrize("model", list(FAMILIES))
def test_predict_is_the_stock_pipelines_own_transformer_call(tiny_pipelines, model):
    """Our encode_prompt + predict reproduce one denoising call of the stock pipeline: the same text (template,
    dropped tokens, padding and mask), packing, positions, timestep scale and sign."""
    from personalize.models.families import describe

    family, pipe = describe(FAMILIES[model]), tiny_pipelines(model)
    latents, timestep, expected = _stock_call(model, pipe)
    with torch.no_grad():
        embeds = family.encode_prompt(pipe, ["a photo of sks cat"])
        ours = family.predict(pipe.transformer, latents, timestep.float(), embeds, family.guidance_scale)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_predict_in_training_mode_is_the_inference_prediction(tiny_pipelines, model):
    """Training mode changes nothing a step sees (HiDream's transformer would otherwise return another layout
    and route its experts differently): the loss compares the same (B, C, h, w) prediction as inference."""
    from personalize.models.families import describe

    family = describe(FAMILIES[model])
    transformer = copy.deepcopy(tiny_pipelines(model).transformer)
    embeds = family.encode_prompt(tiny_pipelines(model), ["a photo of sks cat"])
    channels = family.latent_channels(transformer.config)
    latents = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([400.0])
    with torch.no_grad():
        inference = family.predict(transformer.eval(), latents, timesteps, embeds, family.guidance_scale)
        training = family.predict(transformer.train(), latents, timesteps, embeds, family.guidance_scale)
    assert training.shape == latents.shape
    torch.testing.assert_close(training, inference, rtol=1e-5, atol=1e-5)
