"""`personalize train --task edit` on tiny-flux-kontext: (source, target, instruction) triples end to end."""

import json

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from personalize.cli import main

from .conftest import one_line_error


@pytest.fixture
def pairs(tmp_path):
    """targets/pair{i}.png = sources/pair{i}.png with a yellow disc added; instructions for two of them."""
    targets, sources = tmp_path / "targets", tmp_path / "sources"
    targets.mkdir()
    sources.mkdir()
    for i in range(3):
        source = Image.new("RGB", (64, 64), (40 + 60 * i, 90, 160))
        ImageDraw.Draw(source).rectangle([8 + 4 * i, 8, 36, 36], fill=(20, 20, 200))
        source.save(sources / f"pair{i}.png")
        ImageDraw.Draw(source).ellipse([24, 24, 60, 60], fill=(250, 240, 0))
        source.save(targets / f"pair{i}.png")
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("# edits\npair0: add a yellow ball\npair1.png: put a yellow ball in front\n")
    return targets, sources, instructions


def _argv(pairs, out, cache_dir, *more):
    targets, sources, instructions = pairs
    argv = ["train", "--task", "edit", "--images", str(targets), "--control", str(sources)]
    argv += ["--captions", str(instructions), "--model", "tiny-flux-kontext", "--steps", "2", "--output", str(out)]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1", "--set", "validation_images=1"]
    return [*argv, "--set", "checkpoint_every=0", *more]


def test_edit_trains_on_pairs_through_the_cli_and_generate_edits(capsys, monkeypatch, tmp_path, cache_dir, pairs):
    from personalize.trainers.diffusion import flow_step

    seen = []
    per_sample_loss = flow_step.per_sample_loss

    def spy(family, transformer, latents, embeds, *rest):
        seen.append((latents.clone(), rest[-1]))
        return per_sample_loss(family, transformer, latents, embeds, *rest)

    monkeypatch.setattr(flow_step, "per_sample_loss", spy)
    out = tmp_path / "edit"
    assert main(_argv(pairs, out, cache_dir, "--lr", "5e-2", "--rank", "4")) == 0
    printed = capsys.readouterr().out
    assert "tiny-flux-kontext (flux-kontext)" in printed
    assert len(seen) == 2
    for latents, reference in seen:  # the source's latents, clean and aligned with the target's
        assert reference is not None and reference.shape == latents.shape == (1, 16, 8, 8)
        assert (reference.to(latents.device) - latents).abs().max() > 1e-2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["edit"] == {"sources": str(pairs[1]), "instructions": str(pairs[2])}
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "samples" / "step-000002.png").is_file()
    assert "add a yellow ball" in (out / "README.md").read_text()  # pair0's instruction is the run's prompt

    source = str(pairs[1] / "pair2.png")
    common = ["generate", "--model", "tiny-flux-kontext", "--prompt", "add a yellow ball", "--image", source]
    common += ["--steps", "2", "--width", "64", "--height", "64"]
    assert main([*common, "--adapter", str(out), "--output", str(tmp_path / "edited.png")]) == 0
    assert main([*common, "--output", str(tmp_path / "plain.png")]) == 0
    edited, plain = Image.open(tmp_path / "edited.png"), Image.open(tmp_path / "plain.png")
    assert edited.size == (64, 64) and json.loads(edited.info["personalize"])["image"] == source
    difference = torch.tensor(list(edited.convert("L").getdata())) - torch.tensor(list(plain.convert("L").getdata()))
    assert difference.abs().max() > 0  # the adapter changes the edit


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux2-klein", "tiny-flux2"])
def test_flux2_reference_image_edit_trains_and_generates(capsys, tmp_path, cache_dir, pairs, model):
    out = tmp_path / "edit"
    assert main([*_argv(pairs, out, cache_dir, "--lr", "5e-2", "--rank", "4"), "--model", model]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    source = str(pairs[1] / "pair2.png")
    argv = ["generate", "--model", model, "--prompt", "add a yellow ball", "--image", source, "--adapter", str(out)]
    assert main([*argv, "--steps", "2", "--width", "64", "--height", "64", "--output", str(tmp_path / "e.png")]) == 0
    assert Image.open(tmp_path / "e.png").size == (64, 64)


def test_predict_edit_appends_source_tokens_with_their_own_position_ids(tiny_pipelines):
    from personalize.models.families import describe

    family = describe("flux-kontext")
    transformer = tiny_pipelines("tiny-flux-kontext").transformer
    calls = []
    handle = transformer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    noisy, source = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 6, 4)
    text = torch.randn(1, 7, 32)
    embeds = {"prompt_embeds": text, "pooled_prompt_embeds": torch.randn(1, 32)}
    with torch.no_grad():
        prediction = family.predict_edit(transformer, noisy, torch.tensor([500.0]), embeds, 3.5, source)
        plain = family.predict(transformer, noisy, torch.tensor([500.0]), embeds, 3.5)
    handle.remove()
    assert prediction.shape == noisy.shape
    assert calls[0]["hidden_states"].shape == (1, 16 + 6, 64)  # 4x4 noisy patches + 3x2 source patches
    ids = calls[0]["img_ids"]
    assert ids[:16, 0].eq(0).all() and ids[16:, 0].eq(1).all()  # index 1: the reference image (Kontext)
    assert ids[16:, 1].max() == 2 and ids[16:, 2].max() == 1  # its own rows and columns
    assert (prediction - plain).abs().max() > 1e-4  # the source tokens change the prediction


def test_edit_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, cache_dir, pairs):
    targets, sources, instructions = pairs
    out = tmp_path / "out"
    (sources / "pair1.png").rename(sources / "other.png")
    error = one_line_error(capsys, _argv(pairs, out, cache_dir))
    assert "pair1.png" in error and "other.png" in error  # both unpaired files are named
    (sources / "other.png").rename(sources / "pair1.png")
    instructions.write_text("pair9: add a ball\n")
    assert "pair9" in one_line_error(capsys, _argv(pairs, out, cache_dir))
    instructions.write_text("add a ball everywhere\n")
    assert "name: instruction" in one_line_error(capsys, _argv(pairs, out, cache_dir))
    error = one_line_error(capsys, [*_argv(pairs, out, cache_dir), "--model", "tiny-flux"])
    assert "flux-kontext" in error and "edit" in error  # a family without a source input names those with one
    assert "edit model" in one_line_error(capsys, [*_argv(pairs, out, cache_dir), "--model", "tiny-sd15"])  # a UNet
    error = one_line_error(capsys, ["train", "--images", str(targets), "--control", str(sources)])
    assert "--task edit" in error
    error = one_line_error(capsys, ["train", "--task", "edit", "--images", str(targets)])
    assert "--control" in error
    assert not out.exists()
    error = one_line_error(
        capsys, ["generate", "--model", "tiny-flux", "--prompt", "x", "--image", str(sources / "pair0.png")]
    )
    assert "edit model" in error


QWEN_EDITS = {"tiny-qwen-image-edit": "qwen-image-edit", "tiny-qwen-image-edit-plus": "qwen-image-edit-plus"}


def _pixels(path):
    return torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.float32).view(64, 64, 3) / 255


@pytest.mark.parametrize(
    "model", ["tiny-qwen-image-edit", pytest.param("tiny-qwen-image-edit-plus", marks=pytest.mark.slow)]
)
def test_qwen_edit_reads_each_source_once_and_loads_alike_in_the_stock_pipeline(
    capsys, monkeypatch, tmp_path, cache_dir, pairs, tiny_pipelines, model
):
    """Qwen-Image-Edit's text encoder reads the instruction with its source picture: each pair is encoded
    once (the encoder is not cached away), and the adapter gives the stock pipeline's edit through
    QwenImageLoraLoaderMixin what our loader gives."""
    import copy
    import dataclasses

    from personalize.models.families import FLOW_FAMILIES
    from personalize.pipelines import load_adapter

    family = FLOW_FAMILIES[QWEN_EDITS[model]]
    calls = []

    def spy(pipe, prompts, sources):
        calls.append((list(prompts), sources.clone()))
        return family.encode_edit_prompt(pipe, prompts, sources)

    monkeypatch.setitem(FLOW_FAMILIES, family.name, dataclasses.replace(family, encode_edit_prompt=spy))
    out = tmp_path / "edit"
    argv = [*_argv(pairs, out, cache_dir, "--lr", "5e-2", "--rank", "4"), "--model", model]
    assert main([*argv, "--resolution", "64", "--steps", "5"]) == 0
    assert f"{model} ({family.name})" in capsys.readouterr().out
    sources = {name: _pixels(pairs[1] / f"{name}.png").permute(2, 0, 1) for name in ("pair0", "pair1", "pair2")}
    assert 1 <= len(calls) <= 3  # 5 steps over 3 pairs: each (source, instruction) encoded once
    for prompts, pictures in calls:
        assert any(torch.allclose(pictures[0], source, atol=1 / 255) for source in sources.values())
        assert prompts[0] in ("add a yellow ball", "put a yellow ball in front") or "sks" in prompts[0]

    source = pairs[1] / "pair2.png"
    ours, stock = copy.deepcopy(tiny_pipelines(model)), copy.deepcopy(tiny_pipelines(model))
    load_adapter(ours, out)
    stock.load_lora_weights(str(out))
    arguments = dict(prompt="add a yellow ball", height=64, width=64, num_inference_steps=2, output_type="pt")
    arguments["image"] = Image.open(source).convert("RGB")
    with torch.no_grad():
        mine, theirs = (pipe(generator=torch.Generator().manual_seed(0), **arguments).images for pipe in (ours, stock))
        plain = tiny_pipelines(model)(generator=torch.Generator().manual_seed(0), **arguments).images
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (mine - plain).abs().max() > 1e-3  # the adapter changes the edit

    common = ["generate", "--model", model, "--prompt", "add a yellow ball", "--image", str(source), "--steps", "2"]
    common += ["--width", "64", "--height", "64", "--adapter", str(out), "--output", str(tmp_path / "edited.png")]
    assert main(common) == 0 and Image.open(tmp_path / "edited.png").size == (64, 64)


@pytest.mark.parametrize("model", sorted(QWEN_EDITS))
def test_qwen_edit_prompt_and_prediction_are_the_pipelines_own(tiny_pipelines, model):
    """The stock edit pipeline's transformer call, recomputed: `encode_edit_prompt` on the picture its text
    encoder saw gives its `encoder_hidden_states`, and `predict_edit` on its noisy and source tokens its output."""
    from personalize.models.families import describe
    from personalize.models.families.flux import unpack

    family, pipe = describe(QWEN_EDITS[model]), tiny_pipelines(model)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    source = Image.new("RGB", (64, 64), (200, 40, 90))
    ImageDraw.Draw(source).rectangle([8, 8, 30, 40], fill=(20, 200, 20))
    with torch.no_grad():
        pipe(image=source, prompt="add a ball", num_inference_steps=2, height=64, width=64, output_type="latent")
        hook.remove()
        kwargs, expected = calls[0]
        (_, h, w), (_, rh, rw) = kwargs["img_shapes"][0]  # the noisy and the source latents' 2x2 patch grids
        tokens = kwargs["hidden_states"]  # (1, h * w noisy + rh * rw source, 4C)
        assert (h, w) == (4, 4) and tokens.shape[1] == h * w + rh * rw
        # Edit shows the encoder the source at the VAE's size (1024 px area here); Edit-Plus at a 384 px area
        seen = source  # Edit-Plus resizes it itself
        if family.name == "qwen-image-edit":
            seen = pipe.image_processor.resize(source, 16 * rh, 16 * rw)  # 8x VAE, 2x2 patches
        embeds = family.encode_edit_prompt(pipe, ["add a ball"], _as_tensor(seen))
        torch.testing.assert_close(embeds["prompt_embeds"], kwargs["encoder_hidden_states"])
        noisy, reference = unpack(tokens[:, : h * w], 2 * h, 2 * w), unpack(tokens[:, h * w :], 2 * rh, 2 * rw)
        ours = family.predict_edit(pipe.transformer, noisy, kwargs["timestep"] * 1000, embeds, None, reference)
        plain = family.predict(pipe.transformer, noisy, kwargs["timestep"] * 1000, embeds, None)
    torch.testing.assert_close(ours, unpack(expected[:, : h * w], 2 * h, 2 * w), rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-4  # the source tokens change the prediction


def _as_tensor(picture):
    width, height = picture.size
    pixels = torch.tensor(list(picture.convert("RGB").getdata()), dtype=torch.float32) / 255
    return pixels.view(height, width, 3).permute(2, 0, 1)[None]  # (1, 3, H, W) in [0, 1]


def test_a_qwen_edit_folder_loads_where_torchvision_is_missing(tmp_path, tiny_pipelines):
    """A released Qwen-Image-Edit folder names transformers' Qwen2VLProcessor, whose video half needs
    torchvision; load_pipeline reads its image processor and tokenizer alone (personalize.models.vl_processor)."""
    from personalize.models import load_pipeline

    folder = tmp_path / "qwen-edit"
    tiny_pipelines("tiny-qwen-image-edit").save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]  # as in Qwen/Qwen-Image-Edit
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(str(folder))
    picture = Image.new("RGB", (64, 48), (30, 90, 200))
    with torch.no_grad():
        loaded = pipe.encode_prompt(["make it red"], image=[picture])[0]
        built = tiny_pipelines("tiny-qwen-image-edit").encode_prompt(["make it red"], image=[picture])[0]
    torch.testing.assert_close(loaded, built)
