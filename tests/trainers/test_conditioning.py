"""ControlNet, T2I-Adapter and IP-Adapter training on tiny-sd15 and tiny-sdxl: learning, stock loading, errors."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from personalize.cli import main
from personalize.trainers.diffusion.config import config_from_options, resolve

from .conftest import CAT

METHODS = ["controlnet", "t2i-adapter", "ip-adapter"]
MODELS = ["tiny-sd15", "tiny-sdxl"]


def _config(method, model, **options):
    settings = dict(images=str(CAT), model=model, method=method, resolution=64, num_workers=0)
    settings.update(options)
    return resolve(config_from_options(settings))[0]


def _fixed_batch(method_module, config):
    from personalize.data import build_dataset, collate

    images = build_dataset(config.data, seed=0)
    data = method_module.pair(images, config.conditioning)
    return collate([data[(0, index)] for index in range(2)])


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss_on_a_fixed_batch(tiny_pipelines, method, model):
    """Same batch, noise, timesteps and dropout every step (the generator is reseeded): the loss must fall."""
    from personalize.trainers.conditioning.recipe import loss_function, recipe

    pipe = copy.deepcopy(tiny_pipelines(model))
    family = "sdxl" if model == "tiny-sdxl" else "sd1"
    config = _config(method, model, conditioning={"prompt_dropout": 0.0, "image_dropout": 0.0})
    module = recipe(method)
    batch = _fixed_batch(module, config)
    side = module.build(pipe, family, config)
    params = [param for module_ in side.values() for param in module_.parameters() if param.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    generator = torch.Generator()
    compute_loss = loss_function(pipe, family, module, side, config, generator)
    history = []
    for _ in range(4):
        generator.manual_seed(0)
        loss, _ = compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(float(loss.detach()))
    assert history[-1] < history[0], history
    module.restore(pipe, side)


@pytest.mark.parametrize("model", MODELS)
def test_zero_initialized_controlnet_leaves_the_base_unchanged(tiny_pipelines, model):
    from personalize.trainers.conditioning import controlnet

    pipe = tiny_pipelines(model)
    family = "sdxl" if model == "tiny-sdxl" else "sd1"
    config = _config("controlnet", model)
    net = controlnet.build(pipe, family, config)["controlnet"]
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 32, 32, generator=generator)
    t = torch.tensor([10, 700])
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    kwargs = {"encoder_hidden_states": text}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=generator),
            "time_ids": torch.ones(2, 6),
        }
    batch = {"conditioning": torch.rand(2, 3, 64, 64, generator=generator)}
    with torch.no_grad():
        base = pipe.unet(noisy, t, **kwargs).sample
        steered = controlnet.predict(pipe.unet, {"controlnet": net}, noisy, t, kwargs, batch, config, generator)
    assert torch.allclose(base, steered, atol=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_controlnet_run_writes_a_folder_stock_controlnetmodel_loads(quick, model):
    from diffusers import ControlNetModel

    result = quick(model=model, method="controlnet", steps=1, num_workers=0, lr=1e-3)
    out = result.output_dir
    loaded = ControlNetModel.from_pretrained(str(out))
    assert list(loaded.config.conditioning_embedding_out_channels) == [16, 32]
    assert any(param.abs().sum() > 0 for param in loaded.controlnet_down_blocks.parameters())  # trained
    assert "ControlNetModel.from_pretrained" in (out / "README.md").read_text()
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["conditioning.png", "step-000001.png"]
    assert (out / "config.yaml").is_file() and result.metrics["steps"] == 1


@pytest.mark.parametrize("model", MODELS)
def test_t2i_adapter_run_writes_a_folder_stock_t2iadapter_loads(quick, tiny_pipelines, model):
    from diffusers import T2IAdapter

    result = quick(model=model, method="t2i-adapter", steps=1, num_workers=0)
    adapter = T2IAdapter.from_pretrained(str(result.output_dir))
    assert adapter.config.adapter_type == "full_adapter_xl"  # the tiny UNets start with a plain down block
    features = adapter(torch.rand(1, 3, 64, 64))
    unet = tiny_pipelines(model).unet
    assert [feature.shape[1] for feature in features] == list(unet.config.block_out_channels)
    assert all(feature.shape[-1] == 16 for feature in features)  # 64 px -> latent 32 -> after the first block 16


@pytest.mark.parametrize("model", MODELS)
def test_ip_adapter_run_writes_what_load_ip_adapter_reads(quick, tiny_pipelines, model):
    result = quick(model=model, method="ip-adapter", steps=1, num_workers=0)
    out = result.output_dir
    weights = out / "ip_adapter.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        keys = set(handle.keys())
        info = json.loads(handle.metadata()["personalize"])
    assert {"image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"} <= keys
    assert info["method"] == "ip-adapter"
    base = tiny_pipelines(model)
    assert base.unet.config.encoder_hid_dim_type is None  # the caller's pipeline was restored
    pipe = copy.deepcopy(base)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name="ip_adapter.safetensors")
    assert pipe.image_encoder is not None
    processors = [proc for proc in pipe.unet.attn_processors.values() if hasattr(proc, "to_k_ip")]
    assert len(processors) == len([key for key in keys if key.endswith("to_k_ip.weight")])


def test_ip_adapter_with_scale_zero_equals_the_base(quick, tiny_pipelines):
    from PIL import Image

    result = quick(model="tiny-sd15", method="ip-adapter", steps=1, num_workers=0, lr=1e-2)
    base = tiny_pipelines("tiny-sd15")
    settings = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, output_type="np")
    plain = base(**settings, generator=torch.Generator().manual_seed(0)).images
    pipe = copy.deepcopy(base)
    pipe.load_ip_adapter(str(result.output_dir), subfolder="", weight_name="ip_adapter.safetensors")
    reference = Image.new("RGB", (64, 64), "orange")
    pipe.set_ip_adapter_scale(0.0)
    zero = pipe(**settings, ip_adapter_image=reference, generator=torch.Generator().manual_seed(0)).images
    pipe.set_ip_adapter_scale(1.0)
    full = pipe(**settings, ip_adapter_image=reference, generator=torch.Generator().manual_seed(0)).images
    assert abs(plain - zero).max() < 1e-4
    assert abs(plain - full).max() > 1e-4


def test_controlnet_with_a_core_adapter_saves_merged_plain_weights(quick):
    from diffusers import ControlNetModel

    result = quick(
        method="controlnet", steps=2, num_workers=0, lr=1e-2, rank=2, conditioning={"controlnet_adapter": "lora"}
    )
    assert result.metrics["trainable_params"] < 100_000  # LoRA + zero convs + embedding, not the whole copy
    loaded = ControlNetModel.from_pretrained(str(result.output_dir))  # stock: no adapter keys left over
    assert not [name for name, _ in loaded.named_parameters() if "lora" in name]


def test_t2i_layouts_of_the_real_unets():
    from personalize.errors import UserError
    from personalize.trainers.conditioning.t2i_adapter import adapter_layout, feature_levels

    sd15 = SimpleNamespace(
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], block_out_channels=[320, 640, 1280, 1280]
    )
    sdxl = SimpleNamespace(
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        block_out_channels=[320, 640, 1280],
    )
    assert feature_levels(sd15) == [0, 1, 2, 3] and feature_levels(sdxl) == [1, 1, 2]
    assert adapter_layout(sd15, 8) == dict(
        adapter_type="full_adapter", channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=8
    )
    light = adapter_layout(sd15, 8, "light")  # diffusers' light adapter for SD1.5: 3 channel entries, 4 features
    assert light["adapter_type"] == "light_adapter" and light["channels"] == [320, 640, 1280]
    from diffusers import T2IAdapter

    features = T2IAdapter(in_channels=3, **light)(torch.rand(1, 3, 64, 64))  # one feature per SD1.5 down block
    assert [tuple(feature.shape[1:]) for feature in features] == [(320, 8, 8), (640, 4, 4), (1280, 2, 2), (1280, 1, 1)]
    assert adapter_layout(sdxl, 8) == dict(
        adapter_type="full_adapter_xl", channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=16
    )
    with pytest.raises(UserError, match="light"):
        adapter_layout(sdxl, 8, "light")


def test_cubic_timesteps_favour_the_noisy_end():
    from personalize.trainers.conditioning.recipe import cubic_timesteps

    t = cubic_timesteps(20_000, 1000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999
    assert abs(float((t >= 500).float().mean()) - (0.5 ** (1 / 3))) < 0.02  # P(t >= T/2) = P(u^3 <= 1/2)


def test_cli_mismatched_conditioning_folder_is_one_line_exit_2(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "cond"
    folder.mkdir()
    for name in ("chelsea-01.png", "chelsea-02.png", "other.png"):
        Image.new("RGB", (8, 8)).save(folder / name)
    argv = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--method", "controlnet"]
    argv += ["--conditioning", str(folder), "--output", str(tmp_path / "out"), "--steps", "1"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "chelsea-03.jpg" in error and "other.png" in error and "chelsea-01" not in error


@pytest.mark.parametrize("name", ["sd15-controlnet-canny", "sdxl-t2i-adapter-canny", "sd15-ip-adapter"])
def test_conditioning_presets_load(name):
    from personalize.config import build
    from personalize.trainers.diffusion.config import TrainConfig

    config, _ = resolve(build(TrainConfig, preset=name, flags={"data": {"images": str(CAT)}}))
    assert config.method in METHODS and config.lr and config.steps


@pytest.mark.slow  # three runs; the loop's resume is also tested bit-exactly in test_loop.py
def test_an_interrupted_run_resumes_to_the_same_weights(quick, tmp_path):
    from safetensors.torch import load_file

    options = dict(method="ip-adapter", num_workers=0, lr=1e-2, checkpoint_every=1)
    straight = quick(steps=3, output=str(tmp_path / "straight"), **options)
    quick(steps=2, output=str(tmp_path / "resumed"), **options)
    resumed = quick(steps=3, output=str(tmp_path / "resumed"), resume=True, **options)
    assert resumed.metrics["steps"] == 3
    expected = load_file(str(straight.output_dir / "ip_adapter.safetensors"))
    got = load_file(str(resumed.output_dir / "ip_adapter.safetensors"))
    assert all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.parametrize(("method", "key"), [("t2i-adapter", "folder"), ("ip-adapter", "reference")])
def test_a_paired_folder_is_what_the_run_trains_and_samples_with(quick, tmp_path, method, key):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "paired"
    folder.mkdir()
    for path in sorted(CAT.glob("*.jpg")):
        Image.new("RGB", (80, 60), (0, 200, 0)).save(folder / f"{path.stem}.png")
    result = quick(method=method, steps=1, num_workers=0, conditioning={key: str(folder)})
    name = "reference.png" if method == "ip-adapter" else "conditioning.png"
    used = np.asarray(Image.open(result.output_dir / "samples" / name).convert("RGB"))
    assert used.shape == (64, 64, 3) and (used == [0, 200, 0]).all()
    assert str(folder) in (result.output_dir / "README.md").read_text()


def test_options_for_personalization_only_are_refused(quick):
    from personalize.errors import UserError

    with pytest.raises(UserError, match="--quantize"):
        quick(method="controlnet", quantize="nf4")
    with pytest.raises(UserError, match="--prior-preservation"):
        quick(method="ip-adapter", prior_preservation=True)


@pytest.mark.slow  # two runs
def test_ema_weights_are_what_is_saved(quick, tmp_path):
    from safetensors.torch import load_file

    options = dict(method="ip-adapter", steps=2, num_workers=0, lr=1e-2, ema_decay=0.5)
    raw = quick(output=str(tmp_path / "raw"), **options)
    averaged = quick(output=str(tmp_path / "ema"), ema=True, **options)
    raw_weights = load_file(str(raw.output_dir / "ip_adapter.safetensors"))
    ema_weights = load_file(str(averaged.output_dir / "ip_adapter.safetensors"))
    assert raw.metrics["final_loss"] == averaged.metrics["final_loss"]  # the same training run
    assert not torch.equal(raw_weights["image_proj.proj.weight"], ema_weights["image_proj.proj.weight"])


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("controlnet", {"rank": 2, "conditioning": {"controlnet_adapter": "lora"}}),
        ("t2i-adapter", {}),
        ("ip-adapter", {}),
    ],
)
def test_validate_every_samples_mid_run_without_changing_the_training(quick, tmp_path, method, options):
    """Mid-run samples save the side network to a scratch folder and load it back like the final files
    (for IP-Adapter: out of the UNet and back in); the trained weights match a run without them."""
    from safetensors.torch import load_file

    settings = dict(method=method, steps=2, num_workers=0, lr=1e-2, **options)
    plain = quick(output=str(tmp_path / "plain"), **settings)
    sampled = quick(output=str(tmp_path / "sampled"), validate_every=1, **settings)
    names = sorted(path.name for path in (sampled.output_dir / "samples").iterdir())
    assert [name for name in names if name.startswith("step-")] == ["step-000001.png", "step-000002.png"]
    assert [path.name for path in sampled.samples] == ["step-000001.png", "step-000002.png"]
    assert not [path for path in sampled.output_dir.iterdir() if path.name.startswith("tmp")]  # scratch removed
    weights = "ip_adapter.safetensors" if method == "ip-adapter" else "diffusion_pytorch_model.safetensors"
    expected = load_file(str(plain.output_dir / weights))
    got = load_file(str(sampled.output_dir / weights))
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_no_validation_images_writes_no_samples_and_a_card(quick):
    result = quick(method="t2i-adapter", steps=1, num_workers=0, validation_images=0)
    assert result.samples == [] and (result.output_dir / "README.md").is_file()
    assert "![samples]" not in (result.output_dir / "README.md").read_text()
