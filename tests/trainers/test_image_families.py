"""The families of issue 27 on the flow-matching recipe (Flux Kontext, Chroma, Flux.2 dev / Klein), each
through the CLI on its tiny build: LoRA and LoKr, stock `load_lora_weights`, nf4, resume, detection."""

import copy
import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main

from .conftest import CAT, assert_resume_reproduces

FAMILIES = {
    "tiny-flux-kontext": "flux-kontext",
    "tiny-chroma": "chroma",
    "tiny-flux2": "flux2",
    "tiny-flux2-klein": "flux2-klein",
}
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


def _only(default, models=MODELS):
    """pytest params: `default` runs in the default test run, the other families with the slow tests."""
    return [pytest.param(name, marks=() if name == default else pytest.mark.slow) for name in models]


def _train(model, out, cache_dir, method):
    assert main(_argv(model, out, cache_dir, "--method", method, "--rank", "4", "--lr", "5e-2")) == 0
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2
    keys = load_file(str(out / f"{out.name}.safetensors")).keys()
    assert keys and all(key.startswith("lora_transformer_") for key in keys)  # the single-file (ComfyUI) style
    return keys


@pytest.mark.parametrize("model", MODELS)
def test_lora_through_the_cli_loads_alike_in_the_stock_pipeline_and_ours(
    capsys, tmp_path, cache_dir, tiny_pipelines, model
):
    from personalize.pipelines import load_adapter

    out = tmp_path / "run"
    _train(model, out, cache_dir, "lora")
    printed = capsys.readouterr().out
    assert f"{model} ({FAMILIES[model]})" in printed and "objective   flow matching" in printed
    ours, stock = copy.deepcopy(tiny_pipelines(model)), copy.deepcopy(tiny_pipelines(model))
    load_adapter(ours, out)
    stock.load_lora_weights(str(out))  # the family's diffusers LoRA mixin (Flux's for Kontext and Chroma)
    with torch.no_grad():
        mine, theirs = _images(ours), _images(stock)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
        assert (mine - _images(tiny_pipelines(model))).abs().max() > 1e-3  # the adapter changes the image


@pytest.mark.parametrize("model", _only("tiny-flux-kontext"))
def test_lokr_through_the_cli_loads_with_load_adapter(tmp_path, cache_dir, tiny_pipelines, model):
    from personalize.pipelines import load_adapter

    out = tmp_path / "run"
    assert "lokr_w1" in " ".join(_train(model, out, cache_dir, "lokr"))
    pipe = copy.deepcopy(tiny_pipelines(model))
    load_adapter(pipe, out)
    with torch.no_grad():
        assert (_images(pipe) - _images(tiny_pipelines(model))).abs().max() > 1e-3


@pytest.mark.parametrize("model", _only("tiny-flux2-klein"))
def test_nf4_base_trains_on_cpu(quick, model):
    pytest.importorskip("bitsandbytes")
    result = quick(model=model, method="lora", rank=4, quantize="nf4", validation_images=0)
    assert result.metrics["steps"] == 2 and torch.isfinite(torch.tensor(result.metrics["final_loss"]))


@pytest.mark.parametrize("model", [pytest.param(name, marks=pytest.mark.slow) for name in MODELS])
def test_interrupted_run_resumes_to_the_same_adapter(quick, monkeypatch, tmp_path, model):
    settings = dict(model=model, method="lokr", rank=4, steps=4, lr=1e-3, checkpoint_every=2, validation_images=0)
    assert_resume_reproduces(quick, monkeypatch, tmp_path, **settings)


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


def test_train_text_encoder_on_a_family_without_one_is_one_line(capsys, tmp_path, cache_dir):
    assert main(_argv("tiny-flux2-klein", tmp_path / "out", cache_dir, "--train-text-encoder")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --train-text-encoder") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_flux2_latents_and_positions_are_the_pipelines(tiny_pipelines):
    """Our Flux.2 step feeds the transformer what Flux2Pipeline feeds it: batch-normalized 2x2 latent patches,
    (0, row, column, 0) image ids, (0, 0, 0, l) text ids, and a reference image at T = 10."""
    from diffusers import Flux2Pipeline

    from personalize.models.encode import encode_images
    from personalize.models.families import describe

    pipe = tiny_pipelines("tiny-flux2")
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ours = encode_images(pipe.vae, pixels)  # (2, 128, 4, 4)
        raw = Flux2Pipeline._patchify_latents(pipe.vae.encode(pixels).latent_dist.mode())
    std = torch.sqrt(pipe.vae.bn.running_var + pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1)
    torch.testing.assert_close(ours, (raw - pipe.vae.bn.running_mean.view(1, -1, 1, 1)) / std)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kwargs: calls.append(kwargs), with_kwargs=True)
    text = torch.randn(2, 5, 96)
    reference = torch.randn(2, 128, 3, 2)
    with torch.no_grad():
        out = describe("flux2").predict_edit(
            pipe.transformer, ours, torch.tensor([500.0, 20.0]), {"prompt_embeds": text}, 3.5, reference
        )
    hook.remove()
    assert out.shape == ours.shape
    kwargs = calls[0]
    torch.testing.assert_close(kwargs["hidden_states"][:, :16], Flux2Pipeline._pack_latents(ours))
    assert torch.equal(kwargs["img_ids"][:, :16].long(), Flux2Pipeline._prepare_latent_ids(ours))
    reference_ids = Flux2Pipeline._prepare_image_ids([reference[:1]])  # (1, 6, 4), T = 10
    assert torch.equal(kwargs["img_ids"][:, 16:].long(), reference_ids.expand(2, -1, -1))
    assert torch.equal(kwargs["txt_ids"].long(), Flux2Pipeline._prepare_text_ids(text))
    assert kwargs["guidance"].tolist() == [3.5, 3.5]
    torch.testing.assert_close(kwargs["timestep"], torch.tensor([0.5, 0.02]))


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_planned_peak_is_within_20_percent_of_the_measured_rss(tmp_path, model):
    """Each family's planner estimate against the peak RSS of `personalize train` (fp32, 256 px, LoRA rank 4) on
    its build at 8 heads of 128 (width 1024), 1 + 1 blocks, saved as a folder."""
    from benchmarks.plan_check import Case, measure
    from personalize.models.tiny_flow2 import reduced_pipeline
    from personalize.plan import GB, plan

    folder = tmp_path / model
    reduced_pipeline(model, heads=8).save_pretrained(folder)
    case = Case(model, "no", checkpointing=False, quantize="")  # fp32, 256 px, LoRA rank 4, 2 steps
    measured = measure(folder, case, tmp_path / "run")["peak"]
    planned = plan(str(folder), case.settings(), "cpu").peak
    error = (planned - measured) / measured
    print(f"{model} width 1024: planned {planned / GB:.2f} GB, measured {measured / GB:.2f} GB, {error:+.1%}")
    assert abs(error) <= 0.20


@pytest.mark.parametrize("model", MODELS)
def test_predict_is_the_pipelines_own_transformer_call(tiny_pipelines, model):
    """One denoising call of the stock pipeline, recomputed by the family's `predict` from our encode_prompt:
    the same packing, position ids, text mask, timestep scale and guidance input give the same prediction."""
    from personalize.models.families import describe
    from personalize.models.families.flux import unpack

    family, pipe = describe(FAMILIES[model]), tiny_pipelines(model)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    arguments = dict(num_inference_steps=1, height=64, width=64, output_type="latent")
    arguments["guidance_scale"] = family.guidance_scale or 1.0  # the distilled input, or no CFG pass
    if "max_area" in inspect.signature(pipe.__call__).parameters:
        arguments["max_area"] = 64 * 64
    with torch.no_grad():
        pipe(prompt="a photo of sks cat", generator=torch.Generator().manual_seed(0), **arguments)
        hook.remove()
        kwargs, expected = calls[0]
        tokens = kwargs["hidden_states"]  # (1, N, C)
        if tokens.shape[-1] == pipe.transformer.config.in_channels and family.trained_latents is not None:

            def to_latents(x):  # Flux.2: tokens are the 4 x 4 patch grid
                return x.transpose(1, 2).reshape(1, -1, 4, 4)
        else:

            def to_latents(x):  # Flux.1 layout: 2x2 patches of an 8 x 8 latent
                return unpack(x, 8, 8)

        embeds = family.encode_prompt(pipe, ["a photo of sks cat"])
        ours = family.predict(
            pipe.transformer, to_latents(tokens), kwargs["timestep"] * 1000, embeds, family.guidance_scale
        )
    torch.testing.assert_close(ours, to_latents(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["tiny-flux-kontext", "tiny-flux2-klein"])
def test_predict_edit_is_the_pipelines_own_call_with_a_source_image(tiny_pipelines, model):
    """The stock pipeline editing an image (Kontext) / with a reference image (Flux.2): its transformer call,
    recomputed by `predict_edit` from the noisy and the source tokens it was given, gives the same prediction."""
    from PIL import Image

    from personalize.models.families import describe
    from personalize.models.families.flux import unpack

    family, pipe = describe(FAMILIES[model]), tiny_pipelines(model)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    arguments = dict(num_inference_steps=1, height=64, width=64, output_type="latent")
    arguments["guidance_scale"] = family.guidance_scale or 1.0
    if "max_area" in inspect.signature(pipe.__call__).parameters:
        arguments.update(max_area=64 * 64, _auto_resize=False)
    source = Image.new("RGB", (64, 64), (200, 40, 90))
    with torch.no_grad():
        pipe(image=source, prompt="add a ball", generator=torch.Generator().manual_seed(0), **arguments)
        hook.remove()
        kwargs, expected = calls[0]
        tokens = kwargs["hidden_states"]  # (1, 16 noisy + 16 source, C)
        assert tokens.shape[1] == 32
        if family.trained_latents is not None:

            def to_latents(x):  # Flux.2: tokens are the 4 x 4 patch grid
                return x.transpose(1, 2).reshape(1, -1, 4, 4)
        else:

            def to_latents(x):  # Flux.1 layout: 2x2 patches of an 8 x 8 latent
                return unpack(x, 8, 8)

        embeds = family.encode_prompt(pipe, ["add a ball"])
        noisy, reference = to_latents(tokens[:, :16]), to_latents(tokens[:, 16:])
        ours = family.predict_edit(
            pipe.transformer, noisy, kwargs["timestep"] * 1000, embeds, family.guidance_scale, reference
        )
    torch.testing.assert_close(ours, to_latents(expected[:, :16]), rtol=1e-4, atol=1e-4)


CARD_PRESETS = {
    "flux2-klein-lora-16gb": ("flux2-klein", 16),
    "flux2-klein-lora-24gb": ("flux2-klein", 24),
    "chroma-lora-16gb": ("chroma", 16),
    "chroma-lora-24gb": ("chroma", 24),
    "flux-kontext-lora-16gb": ("flux-kontext", 16),
    "flux-kontext-lora-24gb": ("flux-kontext", 24),
}


@pytest.mark.parametrize("name", _only("flux2-klein-lora-16gb", sorted(CARD_PRESETS)))
def test_card_presets_open_with_their_command_and_fit_their_card(name):
    """Each preset's own settings, planned on a GPU (no weights read), fit the card it names; the Kontext ones as
    the edit runs they are written for (the source's tokens and the resident VAE counted)."""
    from importlib import resources

    from personalize.config import build
    from personalize.plan import GB, model_config, plan, settings_of
    from personalize.trainers.diffusion.config import TrainConfig

    text = resources.files("personalize.configs").joinpath(f"{name}.yaml").read_text()
    assert text.startswith("# personalize train ") and f"--preset {name}" in text.splitlines()[0]
    family, gigabytes = CARD_PRESETS[name]
    flags = {"data": {"images": str(CAT)}, **({"edit": {"sources": str(CAT)}} if "kontext" in name else {})}
    config = build(TrainConfig, preset=name, flags=flags)
    assert settings_of(config).edit == ("kontext" in name)
    assert model_config(config.model)[0].name == family
    assert plan(config.model, settings_of(config), "cuda").peak <= gigabytes * GB


@pytest.mark.slow
def test_flux2_dev_fits_no_24gb_card_and_says_what_is_closest(capsys):
    """FLUX.2-dev has no card preset: its 24B Mistral text encoder alone is 45 GB in bf16 while it caches."""
    assert main(["plan", "--model", "black-forest-labs/FLUX.2-dev", "--resolution", "1024", "--vram", "24GB"]) == 2
    assert "nothing fits 24 GB" in capsys.readouterr().err
