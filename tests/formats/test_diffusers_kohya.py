"""diffusers and kohya/LyCORIS layouts: exact round trips, stock diffusers loading, SDXL block names, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from personalize import adapters
from personalize.errors import UserError
from personalize.formats import read_adapter, save_adapter
from personalize.models.tiny_layers import randomize

from .helpers import (
    ADAPTER_METHODS,
    HYPER,
    assert_same_components,
    copy_pipeline,
    images,
    text_out,
    unet_inputs,
    unet_out,
    with_adapter,
)

FAMILY = {"tiny-sd15": "sd1", "tiny-sdxl": "sdxl"}


@pytest.mark.parametrize(
    ("name", "method"),
    [
        pytest.param("tiny-sd15", "lora", marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", "locon", marks=pytest.mark.slow),
        pytest.param("tiny-sd15", "locon", marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", "lora", marks=pytest.mark.slow),
        pytest.param("tiny-sdxl", "dora", marks=pytest.mark.slow),
    ],
)
def test_stock_load_lora_weights_gives_our_images(tiny_pipelines, tmp_path, name, method):
    pipe = tiny_pipelines(name)
    ours, components = with_adapter(pipe, method)
    files = save_adapter(tmp_path, components, method=method, family=FAMILY[name], hyper=HYPER[method])
    assert {f.name for f in files} == {"pytorch_lora_weights.safetensors", f"{tmp_path.name}.safetensors"}
    stock = copy_pipeline(pipe)
    stock.load_lora_weights(tmp_path)
    ours_images, stock_images = images(ours), images(stock)
    assert abs(ours_images - images(pipe)).max() > 1e-3  # the adapter changes the images
    assert abs(ours_images - stock_images).max() < 1e-4


@pytest.mark.parametrize(("name", "method"), [("tiny-sd15", "dora"), ("tiny-sdxl", "dora"), ("tiny-sdxl", "locon")])
def test_stock_load_lora_weights_matches_our_layers(tiny_pipelines, tmp_path, name, method):
    """LoRA, LoCon and DoRA (magnitudes in peft's lora_magnitude_vector): same UNet and text encoder outputs."""
    pipe = tiny_pipelines(name)
    ours, components = with_adapter(pipe, method)
    save_adapter(tmp_path, components, method=method, family=FAMILY[name], hyper={})
    stock = copy_pipeline(pipe)
    stock.load_lora_weights(tmp_path)
    inputs = unet_inputs(pipe)
    assert torch.allclose(unet_out(stock, inputs), unet_out(ours, inputs), atol=1e-5)
    assert torch.allclose(text_out(stock), text_out(ours), atol=1e-5)
    if name == "tiny-sdxl":
        ids = torch.arange(2, 9)[None]
        with torch.no_grad():
            assert torch.allclose(stock.text_encoder_2(ids)[0], ours.text_encoder_2(ids)[0], atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_kohya_round_trip_is_exact(tiny_pipelines, tmp_path, name, method):
    pipe = tiny_pipelines(name)
    ours, components = with_adapter(pipe, method)
    save_adapter(tmp_path, components, method=method, family=FAMILY[name], hyper=HYPER[method], output_name="subject")
    read = read_adapter(tmp_path / "subject.safetensors", pipe)
    assert read.layout == "kohya" and read.method == method
    assert_same_components(components, read.components)
    if name == "tiny-sd15":  # the loaded adapter computes what ours does
        loaded = copy_pipeline(pipe)
        read.apply(loaded)
        inputs = unet_inputs(pipe)
        assert torch.allclose(unet_out(loaded, inputs), unet_out(ours, inputs), atol=1e-6)
        assert torch.allclose(text_out(loaded), text_out(ours), atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_diffusers_folder_round_trip_is_exact(tiny_pipelines, tmp_path, name):
    pipe = tiny_pipelines(name)
    _, components = with_adapter(pipe, "dora")
    save_adapter(tmp_path, components, method="dora", family=FAMILY[name], hyper={})
    read = read_adapter(tmp_path, pipe)
    assert read.layout == "diffusers"
    assert_same_components(components, read.components)


def test_sdxl_kohya_uses_sgm_names_and_reads_diffusers_style_too(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines("tiny-sdxl")
    _, components = with_adapter(pipe, "locon")
    save_adapter(tmp_path, components, method="locon", family="sdxl", hyper={}, output_name="x")
    keys = load_file(tmp_path / "x.safetensors")
    names = {k.partition(".")[0] for k in keys}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # down_blocks.0.resnets.0.conv1
    assert "lora_unet_output_blocks_2_2_conv" in names  # up_blocks.0.upsamplers.0.conv (after an attention)
    assert "lora_unet_middle_block_1_proj_in" in names
    assert any(n.startswith("lora_te1_text_model_") for n in names)
    assert any(n.startswith("lora_te2_text_model_") for n in names)
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    # the same weights under diffusers-style kohya names read to the same canonical dict
    diffusers_style = {}
    for component, sd in components.items():
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]
        for key, value in sd.items():
            path, tail = _split(key)
            diffusers_style[f"{prefix}_{path.replace('.', '_')}.{tail}"] = value
    save_file(diffusers_style, tmp_path / "y.safetensors")
    assert_same_components(components, read_adapter(tmp_path / "y.safetensors", pipe).components)


def _split(key: str) -> tuple[str, str]:
    for tail in ("lora_down.weight", "lora_up.weight", "alpha"):
        if key.endswith("." + tail):
            return key[: -len(tail) - 1], tail
    raise AssertionError(key)


def test_lohas_cannot_be_written_as_diffusers_layout(tiny_pipelines, tmp_path):
    from personalize.formats.diffusers import to_diffusers

    _, components = with_adapter(tiny_pipelines("tiny-sd15"), "loha", text=False)
    with pytest.raises(UserError, match="diffusers layout holds LoRA"):
        to_diffusers(components)


def test_unknown_module_names_are_listed(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines("tiny-sd15")
    _, components = with_adapter(pipe, "lora", text=False)
    save_adapter(tmp_path, components, method="lora", family="sd1", hyper={}, output_name="x")
    tensors = load_file(tmp_path / "x.safetensors")
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="lora_unet_down_blocks_9_attentions_0_proj_in"):
        read_adapter(tmp_path / "bad.safetensors", pipe)


def test_shape_mismatch_names_key_and_shapes(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines("tiny-sd15")
    _, components = with_adapter(pipe, "lora", text=False)
    save_adapter(tmp_path, components, method="lora", family="sd1", hyper={}, output_name="x")
    tensors = load_file(tmp_path / "x.safetensors")
    key = next(k for k in tensors if k.endswith("attn1_to_q.lora_down.weight"))
    tensors[key] = torch.zeros(4, 33)
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match=r"has shape \(4, 33\).*layer's weight is \(64, 64\)"):
        read_adapter(tmp_path / "bad.safetensors", pipe)


def test_unknown_format_and_pickle_are_refused(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines("tiny-sd15")
    save_file({"some.weird.key": torch.zeros(3, 3, 3)}, tmp_path / "odd.safetensors")
    with pytest.raises(UserError, match="keys seen: some.weird.key"):
        read_adapter(tmp_path / "odd.safetensors", pipe)
    save_file({"lora_unet_conv_in.lora_mid.weight": torch.zeros(2, 2, 3, 3)}, tmp_path / "tucker.safetensors")
    with pytest.raises(UserError, match="does not read: lora_mid.weight"):
        read_adapter(tmp_path / "tucker.safetensors", pipe)
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="pickle"):
        read_adapter(tmp_path / "x.pt", pipe)


def test_failed_save_writes_nothing(tiny_pipelines, tmp_path):
    _, components = with_adapter(tiny_pipelines("tiny-sd15"), "loha", text=False)
    with pytest.raises(UserError):
        save_adapter(tmp_path / "out", components, method="bitfit", family="sd1", hyper={})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_alpha_conventions_old_diffusers_keys_and_network_alphas(tiny_pipelines):
    """Old `lora.down/lora.up` keys without alphas mean scale 1; `.alpha` keys are used when present."""
    from personalize.formats.diffusers import from_diffusers

    down, up = torch.randn(4, 32), torch.randn(32, 4)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    old = from_diffusers({f"unet.{path}.lora.down.weight": down, f"unet.{path}.lora.up.weight": up})
    assert float(old["unet"][f"{path}.alpha"]) == 4.0
    with_alpha = from_diffusers(
        {f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up, f"unet.{path}.alpha": torch.tensor(2.0)}
    )
    assert float(with_alpha["unet"][f"{path}.alpha"]) == 2.0
    processor = from_diffusers(
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
        }
    )
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_down.weight" in processor["unet"]
    adapters.group_by_module(processor["unet"])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "family"), [("tiny-flux", "flux"), ("tiny-sd3", "sd3")])
def test_dit_lora_loads_in_stock_diffusers_and_round_trips(tiny_pipelines, tmp_path, name, family):
    pipe = tiny_pipelines(name)
    parts = dict(pipe.components)
    parts["transformer"] = copy.deepcopy(pipe.transformer)
    ours = type(pipe)(**parts)
    adapters.inject(ours.transformer, "lora", targets="attention", rank=4, alpha=2)
    for _, module in ours.transformer.named_modules():
        if hasattr(module, "adapters") and "default" in module.adapters:
            randomize(module.adapters["default"], 1)
    components = {"transformer": adapters.state_dict(ours.transformer)}
    save_adapter(tmp_path, components, method="lora", family=family, hyper={}, output_name="x")
    parts["transformer"] = copy.deepcopy(pipe.transformer)
    stock = type(pipe)(**parts)
    stock.load_lora_weights(tmp_path)
    assert abs(images(stock) - images(ours)).max() < 1e-4
    assert_same_components(components, read_adapter(tmp_path / "x.safetensors", pipe).components)


def test_unprefixed_attention_processor_files_belong_to_the_unet(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines("tiny-sd15")
    base = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    save_file(
        {
            f"{base}.processor.to_k_lora.down.weight": torch.ones(2, 32),
            f"{base}.processor.to_k_lora.up.weight": torch.ones(64, 2),
        },
        tmp_path / "pytorch_lora_weights.safetensors",
    )
    read = read_adapter(tmp_path, pipe)
    assert read.layout == "diffusers"
    assert float(read.components["unet"][f"{base}.to_k.alpha"]) == 2.0  # no alpha in the file: scale 1
    assert read.components["unet"][f"{base}.to_k.lora_up.weight"].shape == (64, 2)


def test_raw_canonical_files_and_folders_read(tiny_pipelines, tmp_path):
    """What trainers wrote before this package: "<component>.<path>.<param>" in adapter.safetensors."""
    pipe = tiny_pipelines("tiny-sd15")
    _, components = with_adapter(pipe, "loha")
    flat = {f"{c}.{k}": v.contiguous() for c, sd in components.items() for k, v in sd.items()}
    save_file(flat, tmp_path / "adapter.safetensors")
    read = read_adapter(tmp_path, pipe)
    assert read.layout == "canonical"
    assert_same_components(components, read.components)
