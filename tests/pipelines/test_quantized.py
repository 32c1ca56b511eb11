"""Adapters on a pipeline whose UNet is 4-bit (bitsandbytes NF4, which runs on CPU)."""

import warnings

import pytest
import torch
from pipeline_helpers import latents, pipeline_copy, random_components

from personalize import adapters
from personalize.pipelines import fuse, load_adapter, set_adapter_scale, unfuse, unload_adapter

pytest.importorskip("bitsandbytes")


def test_lora_on_a_4bit_unet(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    components = random_components(pipe, "lora", ("unet",), std=0.2, rank=4)
    adapters.quantize(pipe.unet, "nf4")
    block = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert type(block.to_q).__name__ == "Linear4bit"
    quantized_base = latents(pipe)
    load_adapter(pipe, components, name="cat")
    # one wrapped 4-bit layer: its output is the 4-bit base output plus s * up(down(x)) exactly
    layer = block.to_q
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))  # (B, T, in)
    prefix = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q."
    down, up = components["unet"][prefix + "lora_down.weight"], components["unet"][prefix + "lora_up.weight"]
    scaling = float(components["unet"][prefix + "alpha"]) / down.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + scaling * (x @ down.T @ up.T))
    adapted = latents(pipe)
    assert (adapted - quantized_base).abs().max() > 3e-3
    set_adapter_scale(pipe, "cat", 0.0)
    assert torch.equal(latents(pipe), quantized_base)
    set_adapter_scale(pipe, "cat", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # merging into 4-bit weights re-quantizes (and says so)
        fuse(pipe)
    fused = latents(pipe)
    assert (fused - quantized_base).abs().max() > 3e-3  # the delta is in, up to 4-bit rounding
    unfuse(pipe)  # the kept quantized weights come back, not a re-quantized copy
    torch.testing.assert_close(latents(pipe), adapted, rtol=1e-5, atol=1e-5)
    unload_adapter(pipe)
    assert type(block.to_q).__name__ == "Linear4bit"
    assert torch.equal(latents(pipe), quantized_base)
