"""The DreamBooth / adapter recipe end to end on the tiny models: outputs, learning, resume, prior preservation."""

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .conftest import assert_resume_reproduces

METHOD_OPTIONS = {"krona": {"a1": 4, "a2": 4}}  # the paper's a1=64 does not divide the tiny UNet's 32 channels


@pytest.mark.parametrize("method", ["lora", "locon", "dora", "loha", "lokr", "krona", "ia3", "bitfit", "norm", "full"])
def test_every_method_trains_and_writes_its_outputs(quick, method):
    result = quick(method=method, method_options=METHOD_OPTIONS.get(method, {}), rank=4)
    out = result.output_dir
    assert (out / "config.yaml").is_file() and (out / "README.md").is_file()
    assert [path.name for path in (out / "samples").iterdir()] == ["step-000002.png"]
    assert result.metrics["steps"] == 2 and result.metrics["trainable_params"] > 0
    assert len(json.loads((out / "metrics.json").read_text())["losses"]) == 2
    if method == "full":
        assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        return
    expected = {
        "lora": {"pytorch_lora_weights.safetensors", "out.safetensors"},
        "bitfit": {"adapter.safetensors"},
        "norm": {"adapter.safetensors"},
    }
    expected.update(locon=expected["lora"], dora=expected["lora"])
    weights = {path.name for path in out.glob("*.safetensors")}
    assert weights == expected.get(method, {"out.safetensors"}), weights
    assert method in (out / "README.md").read_text()
    if method in ("bitfit", "norm"):
        tensors = load_file(str(out / "adapter.safetensors"))
        assert tensors and all(key.startswith("unet.") for key in tensors)
        with safe_open(str(out / "adapter.safetensors"), framework="pt") as handle:
            assert json.loads(handle.metadata()["personalize"])["method"] == method


def _fixed_batch_loss(pipe, unet):
    """Mean denoising loss of the five cat images at fixed noise and timesteps."""
    from personalize.data import DataConfig, build_dataset, collate
    from personalize.models.encode import encode_images, encode_text
    from personalize.trainers.diffusion import losses, unet_step

    from .conftest import CAT

    dataset = build_dataset(DataConfig(images=str(CAT), class_word="cat", resolution=64, bucketing=False))
    batch = collate([dataset[index] for index in range(len(dataset))])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = encode_images(pipe.vae, batch["pixels"])  # (5, 4, 32, 32)
        embeds = encode_text(pipe, batch["prompt"])["prompt_embeds"]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.linspace(100, 900, len(latents)).long()
        schedule = unet_step.noise_schedule(pipe.scheduler.config)
        noisy = losses.add_noise(schedule.alphas_cumprod, latents, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=embeds).sample
        return float(losses.per_sample_mse(prediction, noise).mean())


def test_training_lowers_the_loss_on_a_fixed_batch(quick, tiny_pipelines):
    import copy

    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    before = _fixed_batch_loss(pipe, pipe.unet)
    result = quick(method="lora", rank=8, lr=1e-2, steps=12, batch_size=2)
    from personalize.pipelines import load_adapter

    load_adapter(pipe, result.output_dir)  # the written file, read back
    after = _fixed_batch_loss(pipe, pipe.unet)
    assert after < 0.98 * before, (before, after)


def test_interrupted_run_resumes_to_the_same_adapter(quick, monkeypatch, tmp_path):
    settings = dict(method="lora", rank=4, steps=4, lr=1e-3, lr_scheduler="cosine", checkpoint_every=2, ema=True)

    def no_adapter_yet(folder):
        assert not (folder / "b.safetensors").exists()

    resumed = assert_resume_reproduces(quick, monkeypatch, tmp_path, after_kill=no_adapter_yet, **settings)
    assert resumed.metrics["steps"] == 4


def test_prior_preservation_doubles_the_batch_with_class_images(quick, monkeypatch, tmp_path):
    from personalize.trainers.diffusion import losses

    seen = []
    combine = losses.combine

    def spy(per_sample, weights=None, is_class=None, prior_weight=1.0):
        seen.append(is_class.tolist())
        return combine(per_sample, weights, is_class, prior_weight)

    monkeypatch.setattr(losses, "combine", spy)
    class_dir = tmp_path / "class"
    quick(
        method="lora",
        rank=4,
        prior_preservation=True,
        class_dir=str(class_dir),
        num_class_images=2,
        class_image_steps=2,
    )
    assert sorted(path.name for path in class_dir.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert seen == [[False, True], [False, True]]


def test_sdxl_with_text_encoders_min_snr_offset_noise_and_accumulation(quick):
    result = quick(
        model="tiny-sdxl",
        method="lora",
        rank=4,
        train_text_encoder=True,
        snr_gamma=5.0,
        noise_offset=0.05,
        grad_accum=2,
    )
    keys = load_file(str(result.output_dir / "pytorch_lora_weights.safetensors")).keys()
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(str(result.output_dir / "out.safetensors")).keys()
    assert {key.split("_")[1] for key in kohya} == {"unet", "te1", "te2"}


def test_nf4_quantized_base_trains_on_cpu(quick):
    pytest.importorskip("bitsandbytes")
    result = quick(method="lora", rank=4, quantize="nf4")
    assert result.metrics["final_loss"] == result.metrics["final_loss"]  # not NaN
    assert (result.output_dir / "pytorch_lora_weights.safetensors").is_file()


def test_nf4_from_a_saved_folder_reads_weights_from_disk_and_samples_after_remapping(cache_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from personalize.models import save_tiny
    from personalize.trainers import train

    folder = save_tiny("tiny-sd15", tmp_path / "sd15")
    from .conftest import CAT

    options = dict(images=str(CAT), steps=2, resolution=64, cache_dir=str(cache_dir), checkpoint_every=0)
    options.update(validate_every=1)  # the encoders sample, idle (remapped) again, and sample at the end
    result = train(model=str(folder), method="lora", rank=4, quantize="nf4", output=str(tmp_path / "out"), **options)
    assert result.metrics["final_loss"] == result.metrics["final_loss"]  # not NaN
    assert [path.name for path in result.samples] == ["step-000001.png", "step-000002.png"]


def test_model_card_snippet_loads_the_adapter_with_text_encoder(quick):
    result = quick(method="lokr", rank=4, train_text_encoder=True)
    card = (result.output_dir / "README.md").read_text()
    snippet = card.split("```python")[1].split("```")[0]
    call = "pipe(" + '"a photo of sks cat"' + ", num_inference_steps=1, height=64, width=64).images"
    snippet = re.sub(r"pipe\((.*)\)\.images", lambda _: call, snippet)
    namespace = {}
    exec(snippet, namespace)  # the README's own code: builds the pipeline, injects, loads the trained weights
    assert namespace["image"].size == (64, 64)


def test_bf16_base_with_gradient_checkpointing_keeps_the_adapter_fp32(quick):
    result = quick(method="lora", rank=4, mixed_precision="bf16", gradient_checkpointing=True, ema=True)
    tensors = load_file(str(result.output_dir / "pytorch_lora_weights.safetensors"))
    assert {value.dtype for key, value in tensors.items() if not key.endswith("alpha")} == {torch.float32}


def test_bf16_samples_every_step_with_two_prompts(quick):
    """Each sample opens its own autocast context (a used one cannot be entered again)."""
    prompts = ["a photo of sks cat", "sks cat on a beach"]
    result = quick(method="lora", rank=4, mixed_precision="bf16", validation_prompts=prompts, validate_every=1)
    assert [path.name for path in result.samples] == ["step-000001.png", "step-000002.png"]


def test_fp16_on_cpu_is_a_user_error(quick):
    from personalize.errors import UserError

    with pytest.raises(UserError, match="bf16"):
        quick(method="lora", mixed_precision="fp16")


def test_stock_diffusers_load_lora_weights_reads_the_output(quick, tiny_pipelines):
    import copy

    pytest.importorskip("peft")
    from personalize.pipelines import load_adapter

    result = quick(method="lora", rank=4, lr=1e-2, steps=2)
    base = tiny_pipelines("tiny-sd15")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    load_adapter(ours, result.output_dir)
    theirs.load_lora_weights(str(result.output_dir))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        outputs = [pipe.unet(sample, 500, encoder_hidden_states=text).sample for pipe in (base, ours, theirs)]
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)  # the adapter changes the UNet
    torch.testing.assert_close(outputs[2], outputs[1], rtol=1e-4, atol=1e-5)


def test_a_caller_pipeline_records_its_real_source(tiny_pipelines, tmp_path, cache_dir, capsys):
    """train(pipe=...) without model= records where the pipeline came from, never the default hub id."""
    import yaml

    from personalize.cli import main
    from personalize.models import load_pipeline, save_tiny
    from personalize.trainers import train

    from .conftest import CAT

    settings = dict(images=str(CAT), steps=1, resolution=64, cache_dir=str(cache_dir), validation_images=0)
    folder = save_tiny("tiny-sd15", tmp_path / "base")
    result = train(pipe=load_pipeline(str(folder)), output=str(tmp_path / "from-folder"), **settings)
    recorded = yaml.safe_load((result.output_dir / "config.yaml").read_text())["model"]
    assert recorded == str(folder)
    assert str(folder) in (result.output_dir / "README.md").read_text()

    result = train(pipe=copy.deepcopy(tiny_pipelines("tiny-sd15")), output=str(tmp_path / "built"), **settings)
    recorded = yaml.safe_load((result.output_dir / "config.yaml").read_text())["model"]
    assert recorded.startswith("in-memory pipeline") and "stable-diffusion-v1-5" not in recorded
    capsys.readouterr()
    assert main(["train", "--config", str(result.output_dir / "config.yaml"), "--output", str(tmp_path / "rerun")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rerun").exists()


def test_cli_extracts_a_lora_from_a_full_fine_tune(quick, tiny_pipelines, tmp_path, capsys):
    """`personalize convert OUT --to lora-svd` on a --method full run: diffusers + kohya files, per-layer errors."""
    from diffusers import UNet2DConditionModel

    from personalize.cli import main

    result = quick(method="full", steps=2, lr=1e-3)
    capsys.readouterr()
    extracted = tmp_path / "extracted"
    assert main(["convert", str(result.output_dir), str(extracted), "--to", "lora-svd", "--rank", "32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"unet\.down_blocks\.\S+: \d\.\d\de[-+]\d\d", out)
    assert "overall relative error" in out
    assert (extracted / "pytorch_lora_weights.safetensors").is_file()
    assert (extracted / "extracted.safetensors").is_file()

    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    tuned = UNet2DConditionModel.from_pretrained(result.output_dir / "unet")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    with torch.no_grad():
        base_out = pipe.unet(sample, 500, context).sample
        tuned_out = tuned(sample, 500, context).sample
        pipe.load_lora_weights(extracted)  # stock diffusers
        lora_out = pipe.unet(sample, 500, context).sample
    assert (lora_out - tuned_out).norm() < 0.5 * (base_out - tuned_out).norm()
