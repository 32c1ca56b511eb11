"""The single file's original-name layers (ComfyUI maps them only so): Wan entirely, Flux.2's shared
modulations and embedders, Chroma's approximator. Written, read back with and without the model."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from personalize import adapters
from personalize.adapters.targets import wrappable_paths
from personalize.formats import read_adapter, save_adapter
from personalize.formats.kohya import kohya_module_name, name_table, single_file_renames
from personalize.formats.original_names import diffusers_path, kohya_name, original_name

# family, tiny build, layers written lora_unet_<original name> (by their diffusers path), the others' prefix
CASES = {
    "wan": ("tiny-wan", r".*", None),
    "flux2": ("tiny-flux2", r"(double|single)_stream_modulation.*|time_guidance_embed\..*", "lora_transformer_"),
    "flux2-klein": (
        "tiny-flux2-klein",
        r"(double|single)_stream_modulation.*|time_guidance_embed\..*",
        "lora_transformer_",
    ),
    "chroma": ("tiny-chroma", r"distilled_guidance_layer\..*", "lora_transformer_"),
}


def test_wan_layers_take_wans_own_names():
    renames = single_file_renames("wan")
    assert original_name(renames, "blocks.7.attn1.to_out.0") == "blocks.7.self_attn.o"
    assert original_name(renames, "blocks.7.attn2.add_k_proj") == "blocks.7.cross_attn.k_img"
    assert original_name(renames, "blocks.7.ffn.net.0.proj") == "blocks.7.ffn.0"
    assert original_name(renames, "condition_embedder.time_proj") == "time_projection.1"
    assert kohya_name(renames, "proj_out") == "lora_unet_head_head"
    assert diffusers_path(renames, "lora_unet_blocks_12_cross_attn_v") == "blocks.12.attn2.to_v"
    assert original_name(renames, "blocks.7.norm2") is None and diffusers_path(renames, "lycoris_proj_out") is None
    assert single_file_renames("qwen-image") == () and single_file_renames("sdxl") == ()


@pytest.mark.parametrize("family", list(CASES))
def test_every_layer_is_written_in_its_style_and_maps_back(tiny_pipelines, family):
    tiny, renamed, prefix = CASES[family]
    transformer = tiny_pipelines(tiny).transformer
    paths = wrappable_paths(transformer)
    table = name_table({"transformer": paths}, None, single_file_renames(family))
    for path in paths:
        name = kohya_module_name("transformer", path, family)
        if re.fullmatch(renamed, path):
            assert name.startswith("lora_unet_") and name == kohya_name(single_file_renames(family), path)
        else:
            assert name == f"{prefix}{path.replace('.', '_')}", path
        assert table[name] == ("transformer", path)


@pytest.mark.parametrize("family", list(CASES))
def test_an_all_linear_lora_round_trips_through_the_single_file(tiny_pipelines, tmp_path, family):
    transformer = copy.deepcopy(tiny_pipelines(CASES[family][0]).transformer)
    linear = [p for p, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    adapters.inject(transformer, "lora", targets=linear, name="probe", rank=2, alpha=2)
    sd = adapters.state_dict(transformer, "probe")
    adapters.remove(transformer, "probe")
    save_adapter(tmp_path, {"transformer": sd}, method="lora", family=family, hyper={}, output_name="run")
    (read,) = read_adapter(tmp_path / "run.safetensors", transformer).components.values()  # a bare model: "model"
    assert set(read) == set(sd)
    for key, value in sd.items():
        torch.testing.assert_close(read[key], value)
    # without the model (`inspect`, `convert`): the renamed layers come back exactly, from our file's family
    parsed = read_adapter(tmp_path / "run.safetensors", None).components["transformer"]
    renamed = [p for p in adapters.group_by_module(sd) if re.fullmatch(CASES[family][1], p)]
    assert renamed
    for path in renamed:
        for param, value in adapters.group_by_module(sd)[path].items():
            torch.testing.assert_close(parsed[f"{path}.{param}"], value)
