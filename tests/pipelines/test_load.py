"""load_adapter / unload_adapter / fuse / unfuse / set_adapter_scale on tiny stock diffusers pipelines."""

import pytest
import torch
from pipeline_helpers import latents, merged_by_hand, pipeline_copy, random_components, same_state, snapshot

from personalize.errors import UserError
from personalize.pipelines import (
    describe_adapters,
    fuse,
    load_adapter,
    loaded_adapters,
    set_adapter_scale,
    unfuse,
    unload_adapter,
)

CLOSE = dict(rtol=1e-4, atol=1e-4)

# method -> (inject options, UNet targets, std of the random weights: large enough to change the image)
METHODS = {
    "lora": ({"rank": 4, "alpha": 2.0}, "attention", 0.2),
    "locon": ({"rank": 2, "alpha": 1.0}, "conv", 0.1),
    "dora": ({"rank": 4}, "attention", 0.2),
    "loha": ({"rank": 2, "alpha": 1.0}, "attention", 0.5),
    "lokr": ({"rank": 2, "alpha": 1.0, "factor": 4}, "attention+ff", 0.5),
    "krona": ({"a1": 4, "a2": 4}, "attention", 0.2),
    "ia3": ({}, "attention+ff", 0.2),
}


def adapter_for(pipe, method, components=("unet", "text_encoder"), seed=0):
    options, targets, std = METHODS[method]
    return random_components(pipe, method, components, seed=seed, std=std, targets=targets, **options)


FAST = ("lora", "dora", "lokr")  # the others run with -m slow (LoHa is also in the scale test)


@pytest.mark.parametrize("method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_each_method_gives_the_images_of_merging_by_hand_on_sd15(tiny_pipelines, base_latents, method):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    unet, text_encoder = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    components = adapter_for(pipe, method)
    expected = latents(merged_by_hand(pipe, components, scale=0.8))
    load_adapter(pipe, components, scale=0.8, name=method)
    got = latents(pipe)
    assert (got - base_latents("tiny-sd15")).abs().max() > 3e-3  # far above the 1e-4 agreement
    torch.testing.assert_close(got, expected, **CLOSE)
    unload_adapter(pipe, method)
    assert same_state(pipe.unet, unet) and same_state(pipe.text_encoder, text_encoder)


@pytest.mark.parametrize("method", ["lora", pytest.param("lokr", marks=pytest.mark.slow)])
def test_sdxl_routes_weights_to_unet_and_both_text_encoders(tiny_pipelines, base_latents, method):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sdxl")
    components = adapter_for(pipe, method, ("unet", "text_encoder", "text_encoder_2"))
    expected = latents(merged_by_hand(pipe, components))
    load_adapter(pipe, components, name="xl")
    assert loaded_adapters(pipe)["xl"].components == ["unet", "text_encoder", "text_encoder_2"]
    torch.testing.assert_close(latents(pipe), expected, **CLOSE)
    unload_adapter(pipe)
    assert torch.equal(latents(pipe), base_latents("tiny-sdxl"))


@pytest.mark.parametrize(
    ("name", "components"),
    [
        ("tiny-sd3", ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")),
        ("tiny-flux", ("transformer", "text_encoder", "text_encoder_2")),
    ],
)
def test_dit_pipelines_route_weights_to_transformer_and_text_encoders(tiny_pipelines, name, components):
    pipe = pipeline_copy(tiny_pipelines, name)
    size = {"height": 32, "width": 32}
    base = latents(pipe, **size)
    made = random_components(pipe, "lora", components, std=0.3, targets="attention", rank=2)
    expected = latents(merged_by_hand(pipe, made), **size)
    load_adapter(pipe, made, name="dit")
    got = latents(pipe, **size)
    assert (got - base).abs().max() > 3e-3
    torch.testing.assert_close(got, expected, **CLOSE)
    unload_adapter(pipe)
    assert torch.equal(latents(pipe, **size), base)


def test_scale_zero_is_the_base_and_scales_are_independent(tiny_pipelines, base_latents):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    first, second = adapter_for(pipe, "lora", seed=1), adapter_for(pipe, "loha", seed=2)
    load_adapter(pipe, first, scale=0.0, name="first")
    load_adapter(pipe, second, scale=0.0, name="second")
    assert torch.equal(latents(pipe), base_latents("tiny-sd15"))
    set_adapter_scale(pipe, "first", 0.5)
    set_adapter_scale(pipe, "second", 1.5)
    clean = tiny_pipelines("tiny-sd15")  # merged_by_hand copies it
    both = merged_by_hand(merged_by_hand(clean, first, 0.5), second, 1.5)
    torch.testing.assert_close(latents(pipe), latents(both), **CLOSE)
    assert [row["scale"] for row in describe_adapters(pipe)] == [0.5, 1.5]


def test_two_adapters_compose_and_unload_one_leaves_the_other(tiny_pipelines, base_latents):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    first, second = adapter_for(pipe, "lora", seed=1), adapter_for(pipe, "lokr", seed=2)
    load_adapter(pipe, first, scale=0.5, name="first")
    load_adapter(pipe, second, scale=0.7, name="second")
    clean = tiny_pipelines("tiny-sd15")  # merged_by_hand copies it
    both = merged_by_hand(merged_by_hand(clean, first, 0.5), second, 0.7)
    torch.testing.assert_close(latents(pipe), latents(both), **CLOSE)
    assert unload_adapter(pipe, "first") == ["first"]
    torch.testing.assert_close(latents(pipe), latents(merged_by_hand(clean, second, 0.7)), **CLOSE)
    assert unload_adapter(pipe) == ["second"]
    assert torch.equal(latents(pipe), base_latents("tiny-sd15")) and not loaded_adapters(pipe)


def test_fuse_matches_unfused_and_unfuse_then_unload_is_bit_identical(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    unet, text_encoder = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    first, second = adapter_for(pipe, "dora", seed=3), adapter_for(pipe, "lora", seed=4)
    load_adapter(pipe, first, name="a")
    load_adapter(pipe, second, scale=0.5, name="b")
    unfused = latents(pipe)
    assert fuse(pipe) == ["a", "b"]
    torch.testing.assert_close(latents(pipe), unfused, **CLOSE)
    with pytest.raises(UserError, match="unfuse"):
        set_adapter_scale(pipe, "a", 0.3)
    unfuse(pipe, "a")  # out of order: b stays fused
    unfuse(pipe)
    fuse(pipe, "b")
    unload_adapter(pipe)  # unfuses b first
    assert same_state(pipe.unet, unet) and same_state(pipe.text_encoder, text_encoder)
    # without the kept copy, unfuse subtracts the delta again: the weights come back up to rounding
    load_adapter(pipe, first, name="a")
    fuse(pipe, keep_original=False)
    unload_adapter(pipe)
    torch.testing.assert_close(pipe.unet.state_dict(), unet, rtol=1e-5, atol=1e-6)


def test_unload_puts_back_the_original_layer_objects(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    block = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    layer = block.to_q
    load_adapter(pipe, adapter_for(pipe, "lora"), name="a")
    assert block.to_q is not layer and block.to_q.base_layer is layer
    unload_adapter(pipe, "a")
    assert block.to_q is layer


def test_name_and_lookup_errors(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    components = adapter_for(pipe, "lora")
    assert load_adapter(pipe, components) == "adapter"
    assert load_adapter(pipe, components) == "adapter_2"
    with pytest.raises(UserError, match="already loaded"):
        load_adapter(pipe, components, name="adapter")
    with pytest.raises(UserError, match="no adapter named 'cat'"):
        unload_adapter(pipe, "cat")
    with pytest.raises(UserError, match="did you mean 'adapter'"):
        set_adapter_scale(pipe, "adaptr", 1.0)
    with pytest.raises(UserError, match="no adapter weights and no embeddings"):
        load_adapter(pipe, {"unet": {}})
    with pytest.raises(UserError, match="takes a path"):
        load_adapter(pipe, 3)


def test_wrong_family_is_a_clear_error_and_changes_nothing(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    unet, text_encoder = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    xl_components = adapter_for(tiny_pipelines("tiny-sdxl"), "lora", ("unet", "text_encoder", "text_encoder_2"))
    with pytest.raises(UserError, match="text_encoder_2, which this StableDiffusionPipeline does not have"):
        load_adapter(pipe, xl_components)
    # the text encoder part fits (same tiny CLIP), the SDXL UNet's layers do not exist in SD1.5's
    del xl_components["text_encoder_2"]
    with pytest.raises(UserError, match=r"unet: .*do not exist in this UNet2DConditionModel .*down_blocks\.\d"):
        load_adapter(pipe, xl_components)
    assert not loaded_adapters(pipe)
    assert same_state(pipe.unet, unet) and same_state(pipe.text_encoder, text_encoder)


def test_shape_mismatch_names_the_layer_and_rolls_back(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    unet, text_encoder = snapshot(pipe.unet), snapshot(pipe.text_encoder)
    components = adapter_for(pipe, "lora")
    key = next(k for k in components["unet"] if k.endswith("attn2.to_k.lora_down.weight"))
    components["unet"][key] = torch.zeros(4, 768)  # an SD1.5-sized (768) cross-attention input
    with pytest.raises(UserError) as error:
        load_adapter(pipe, {"text_encoder": components["text_encoder"], "unet": components["unet"]}, name="bad")
    message = str(error.value)
    assert key.removesuffix(".lora_down.weight") in message and "lora_down.weight" in message and "768" in message
    assert not loaded_adapters(pipe)
    assert same_state(pipe.unet, unet) and same_state(pipe.text_encoder, text_encoder)
