"""Name maps: kohya names parse back to diffusers paths without a model; SGM <-> diffusers is a bijection."""

from __future__ import annotations

import pytest

from personalize.adapters.targets import wrappable_paths
from personalize.formats.kohya import kohya_module_name
from personalize.formats.kohya_guess import guess_path
from personalize.formats.sdxl_names import SDXL_UNET_CONFIG, block_map, from_sgm, to_sgm


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_every_sd15_kohya_name_parses_back_without_the_model(tiny_pipelines, component):
    pipe = tiny_pipelines("tiny-sd15")
    for path in wrappable_paths(getattr(pipe, component)):
        name = kohya_module_name(component, path, "sd1")
        assert guess_path(name) == (component, path), name


def test_every_tiny_sdxl_layer_has_one_sgm_name_and_maps_back(tiny_pipelines):
    unet = tiny_pipelines("tiny-sdxl").unet
    blocks = block_map(dict(unet.config))
    names = {}
    for path in wrappable_paths(unet):
        sgm = to_sgm(path, blocks)
        assert sgm is not None, path
        assert from_sgm(sgm, blocks) == path
        names[sgm] = path
    assert len(names) == len(wrappable_paths(unet))


def test_released_sdxl_block_names():
    blocks = block_map(SDXL_UNET_CONFIG)
    assert to_sgm("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", blocks) == (
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k"
    )
    assert to_sgm("up_blocks.1.upsamplers.0.conv", blocks) == "output_blocks.5.2.conv"
    assert to_sgm("down_blocks.1.resnets.0.conv_shortcut", blocks) == "input_blocks.4.0.skip_connection"
    assert to_sgm("mid_block.resnets.1.time_emb_proj", blocks) == "middle_block.2.emb_layers.1"
    assert guess_path("lora_unet_output_blocks_0_1_transformer_blocks_3_ff_net_2") == (
        "unet",
        "up_blocks.0.attentions.0.transformer_blocks.3.ff.net.2",
    )
