"""ControlNeXt: cross normalization, training on tiny-sd15 through the CLI, loading the file back into a
stock pipeline (`personalize generate --adapter OUT --control-image IMG` and the Python API)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from personalize.adapters import controlnext as core
from personalize.cli import main

from .conftest import CAT


def test_cross_normalization_takes_the_main_branch_statistics():
    generator = torch.Generator().manual_seed(0)
    control = torch.randn(3, 8, 4, 4, generator=generator) * 50 + 7  # (B, C, h, w), far off in scale
    hidden = torch.randn(3, 8, 4, 4, generator=generator) * 0.3 - 1
    out = core.cross_normalize(control, hidden)
    dims = (1, 2, 3)
    assert torch.allclose(out.mean(dim=dims), hidden.mean(dim=dims), atol=1e-5)
    assert torch.allclose(out.std(dim=dims), hidden.std(dim=dims), atol=1e-5)
    # the pattern of the control is kept: an affine map per sample
    corr = torch.corrcoef(torch.stack([out[0].flatten(), control[0].flatten()]))[0, 1]
    assert corr > 0.9999


def _unet_call(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, 32, 32, generator=generator)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(noisy, torch.tensor([10, 700]), encoder_hidden_states=text).sample


def test_the_control_is_added_after_the_first_down_block_only(tiny_pipelines):
    """The hooks change the first block's output hidden state by s * cross_norm(f, h) and nothing else."""
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    module = core.ControlNeXt(out_dim=pipe.unet.config.block_out_channels[0], scale=0.5)
    seen = {}

    def keep(block, inputs, output):
        seen.setdefault("outputs", []).append(output)

    handle = pipe.unet.down_blocks[0].register_forward_hook(keep)
    base = _unet_call(pipe)
    core.attach(pipe.unet, module, pixels_per_latent=2)
    core.set_control(pipe.unet, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    steered = _unet_call(pipe)
    handle.remove()
    (hidden, skips), (hidden2, skips2) = seen["outputs"]
    assert all(torch.equal(a, b) for a, b in zip(skips, skips2, strict=True))  # skips unchanged
    assert torch.equal(hidden, hidden2)  # our hook runs after this one: the block's own output is the same
    assert not torch.allclose(base, steered)
    core.set_control(pipe.unet, None)
    assert torch.equal(_unet_call(pipe), base)  # no control image: the stock UNet
    core.detach(pipe.unet)
    assert torch.equal(_unet_call(pipe), base)


def test_training_lowers_the_loss_on_a_fixed_batch(tiny_pipelines):
    from personalize.data import build_dataset, collate
    from personalize.trainers.conditioning import controlnext
    from personalize.trainers.conditioning.recipe import loss_function
    from personalize.trainers.diffusion.config import config_from_options, resolve

    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    options = dict(images=str(CAT), model="tiny-sd15", method="controlnext", resolution=64, num_workers=0)
    config = resolve(config_from_options({**options, "conditioning": {"prompt_dropout": 0.0}}))[0]
    data = controlnext.pair(build_dataset(config.data, seed=0), config.conditioning)
    batch = collate([data[(0, index)] for index in range(2)])
    side = controlnext.build(pipe, "sd1", config)
    named = {name: p for name, p in side["controlnext"].named_parameters() if p.requires_grad}
    unet_names = [name for name in named if name.startswith("unet_layers.")]
    assert unet_names and all(name.rsplit(".", 1)[-1] in ("weight", "bias") and "to_out" in name for name in unet_names)
    groups = controlnext.param_groups({f"controlnext.{k}": v for k, v in named.items()}, 1e-3)
    assert [group["lr"] for group in groups] == [1e-2, 1e-3]  # the module at 10 x lr, as the authors
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator()
    compute_loss = loss_function(pipe, "sd1", controlnext, side, config, generator)
    history = []
    for _ in range(4):
        generator.manual_seed(0)
        loss, _ = compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(float(loss.detach()))
    assert history[-1] < history[0], history
    before = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    controlnext.restore(pipe, side)  # the stock UNet: hooks off, trained values out
    original = tiny_pipelines("tiny-sd15").unet.state_dict()
    assert all(torch.equal(p, original[name].to(p.dtype)) for name, p in pipe.unet.named_parameters())
    assert core.attached(pipe.unet) is None
    controlnext.reinstall(pipe, side)  # and back, as after a mid-run sample
    assert all(torch.equal(p, before[name]) for name, p in pipe.unet.named_parameters())
    assert core.attached(pipe.unet) is side["controlnext"].controlnext
    controlnext.restore(pipe, side)


def _edges(path):
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_cli_trains_a_controlnext_and_generate_loads_it(tmp_path, capsys):
    out = tmp_path / "cnx"
    argv = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--method", "controlnext", "--steps", "2"]
    argv += ["--output", str(out), "--lr", "1e-3", "--set", "validation_images=1", "--set", "validation_steps=2"]
    assert main(argv) == 0
    file = out / "controlnext.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
        unet_keys = [key for key in keys if key.startswith("unet.")]
        assert unet_keys and all(".to_out.0." in key for key in unet_keys)
        assert any(key.startswith("controlnext.down_res.") for key in keys)
        trained = handle.get_tensor(unet_keys[0])
    from personalize.models import build_tiny

    base = build_tiny("tiny-sd15").unet.state_dict()[unet_keys[0].removeprefix("unet.")]
    assert not torch.equal(trained, base)  # the UNet subset trained
    card = (out / "README.md").read_text()
    assert "--adapter" in card and "--control-image" in card
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["conditioning.png", "step-000002.png"]
    edges = _edges(tmp_path / "edges.png")
    common = ["generate", "--model", "tiny-sd15", "--prompt", "a cat", "--steps", "2", "--seed", "3"]
    assert main([*common, "--output", str(tmp_path / "base.png")]) == 0
    assert (
        main([*common, "--adapter", str(out), "--control-image", str(edges), "--output", str(tmp_path / "c.png")]) == 0
    )
    assert main([*common, "--adapter", str(out), "--output", str(tmp_path / "noimage.png")]) == 0
    images = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("base", "c", "noimage")}
    assert not np.array_equal(images["c"], images["base"])
    assert not np.array_equal(images["c"], images["noimage"])  # the control image steers it
    capsys.readouterr()
    assert main([*common, "--control-image", str(edges), "--output", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "ControlNeXt" in error


def test_python_api_load_steer_unload(tiny_pipelines, tmp_path):
    from safetensors.torch import save_file

    from personalize.pipelines import load_adapter, set_control_image, unload_adapter
    from personalize.trainers.conditioning import controlnext
    from personalize.trainers.diffusion.config import config_from_options, resolve

    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    config = resolve(config_from_options(dict(images=str(CAT), model="tiny-sd15", method="controlnext")))[0]
    side = controlnext.build(pipe, "sd1", config)
    with torch.no_grad():  # as if trained: the UNet subset moved
        for param in side["controlnext"].unet_layers.parameters():
            param.add_(0.05)
    (tmp_path / "run").mkdir()
    controlnext.save(side, pipe, "sd1", tmp_path / "run", config)
    controlnext.restore(pipe, side)
    base = _unet_call(pipe)
    name = load_adapter(pipe, tmp_path / "run", name="cnx")
    moved = _unet_call(pipe)
    assert not torch.allclose(moved, base)  # the UNet values
    edges = Image.open(_edges(tmp_path / "e.png"))
    set_control_image(pipe, edges)
    assert not torch.allclose(_unet_call(pipe), moved)  # and the control
    set_control_image(pipe, edges, strength=0.0)  # --control-scale 0: only the UNet values act
    assert torch.equal(_unet_call(pipe), moved)
    unload_adapter(pipe, name)
    assert torch.equal(_unet_call(pipe), base) and core.attached(pipe.unet) is None
    bad = {"controlnext.out.weight": torch.zeros(1)}
    save_file(
        bad, str(tmp_path / "bad.safetensors"), metadata={"personalize": '{"method": "controlnext", "controlnext": {}}'}
    )
    from personalize.errors import UserError

    with pytest.raises(UserError, match="do not match"):
        load_adapter(pipe, tmp_path / "bad.safetensors")
    assert core.attached(pipe.unet) is None


@pytest.mark.slow  # one more tiny run; the SD1.5 run above covers the recipe
def test_sdxl_run_trains_and_its_file_steers_a_stock_sdxl_pipeline(quick, tiny_pipelines, tmp_path):
    from personalize.pipelines import load_adapter, set_control_image, unload_adapter

    result = quick(model="tiny-sdxl", method="controlnext", steps=1, num_workers=0, lr=1e-3)
    pipe = copy.deepcopy(tiny_pipelines("tiny-sdxl"))
    settings = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, output_type="np")

    def sample():
        return pipe(**settings, generator=torch.Generator().manual_seed(0)).images

    base = sample()
    name = load_adapter(pipe, result.output_dir)
    set_control_image(pipe, Image.open(_edges(tmp_path / "e.png")))
    assert not np.allclose(sample(), base)
    unload_adapter(pipe, name)
    assert np.array_equal(sample(), base)


def test_the_preset_loads():
    from personalize.config import build
    from personalize.trainers.diffusion.config import TrainConfig, resolve

    config, _ = resolve(build(TrainConfig, preset="sd15-controlnext-canny", flags={"data": {"images": str(CAT)}}))
    assert config.method == "controlnext" and config.lr == 1e-5 and config.conditioning.controlnext_scale == 0.35
