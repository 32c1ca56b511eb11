"""Adapter files on disk (via personalize.formats): every layout loads with the images of the in-memory adapter."""

import pytest
import torch
from pipeline_helpers import latents, pipeline_copy, random_components

from personalize.pipelines import describe_adapters, load_adapter, unload_adapter

formats = pytest.importorskip("personalize.formats")
if not hasattr(formats, "save_adapter"):
    pytest.skip("personalize.formats has no save_adapter yet", allow_module_level=True)

CLOSE = dict(rtol=1e-4, atol=1e-4)
# method -> (inject options for the UNet, std of the random weights)
METHODS = {
    "lora": ({"rank": 4, "alpha": 2.0, "targets": "attention"}, 0.2),
    "locon": ({"rank": 2, "alpha": 1.0, "targets": "all"}, 0.1),
    "dora": ({"rank": 4, "targets": "attention"}, 0.2),
    "loha": ({"rank": 2, "alpha": 1.0, "targets": "attention"}, 0.5),
    "lokr": ({"rank": 2, "alpha": 1.0, "factor": 4, "targets": "attention"}, 0.5),
    "krona": ({"a1": 4, "a2": 4, "targets": "attention"}, 0.2),
}


def in_memory_and_from_file(tiny_pipelines, name, family, method, folder, components_names):
    options, std = METHODS[method]
    pipe = pipeline_copy(tiny_pipelines, name)
    components = random_components(pipe, method, components_names, std=std, **options)
    hyper = {k: v for k, v in options.items() if k != "targets"}
    formats.save_adapter(folder, components, method=method, family=family, hyper=hyper, output_name="style")
    load_adapter(pipe, components, scale=0.7, name="memory")
    expected = latents(pipe)
    unload_adapter(pipe)
    load_adapter(pipe, folder, scale=0.7)
    return pipe, expected


@pytest.mark.parametrize("method", [m if m == "lora" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_every_method_from_its_file_on_sd15(tiny_pipelines, tmp_path, method):
    pipe, expected = in_memory_and_from_file(
        tiny_pipelines, "tiny-sd15", "sd1", method, tmp_path / "out", ("unet", "text_encoder")
    )
    assert describe_adapters(pipe)[0]["name"] == "out"
    torch.testing.assert_close(latents(pipe), expected, **CLOSE)


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "lokr"])
def test_sdxl_files_with_both_text_encoders(tiny_pipelines, tmp_path, method):
    pipe, expected = in_memory_and_from_file(
        tiny_pipelines, "tiny-sdxl", "sdxl", method, tmp_path / "xl", ("unet", "text_encoder", "text_encoder_2")
    )
    torch.testing.assert_close(latents(pipe), expected, **CLOSE)


def test_kohya_file_alone_loads_like_the_folder(tiny_pipelines, tmp_path):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    components = random_components(pipe, "lora", std=0.2, rank=4, targets="attention")
    files = formats.save_adapter(tmp_path, components, method="lora", family="sd1", hyper={"rank": 4}, output_name="k")
    kohya_file = next(path for path in files if path.name == "k.safetensors")
    load_adapter(pipe, tmp_path / "pytorch_lora_weights.safetensors", name="diffusers")
    from_diffusers = latents(pipe)
    unload_adapter(pipe)
    load_adapter(pipe, kohya_file, name="kohya")
    torch.testing.assert_close(latents(pipe), from_diffusers, **CLOSE)


def test_a_file_stock_diffusers_wrote_gives_stock_diffusers_images(tiny_pipelines, tmp_path):
    """A LoRA saved by diffusers' own save_lora_weights (as its DreamBooth script does) loads here with
    the images that stock `load_lora_weights` gives."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    generator = torch.Generator().manual_seed(0)
    peft_state = {}
    for path, layer in pipe.unet.named_modules():
        if path.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0")):
            peft_state[f"{path}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator) / 4
            peft_state[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.3
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(peft_state))
    stock = pipeline_copy(tiny_pipelines, "tiny-sd15")
    stock.load_lora_weights(tmp_path, adapter_name="stock")
    load_adapter(pipe, tmp_path, name="ours")
    torch.testing.assert_close(latents(pipe), latents(stock), **CLOSE)


def test_output_dir_with_lora_and_embeddings(tiny_pipelines, tmp_path):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sdxl")
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
    components = random_components(pipe, "lora", ("unet",), std=0.2, rank=2, targets="attention")
    vectors = {"text_encoder": torch.randn(2, 32), "text_encoder_2": torch.randn(2, 32)}
    formats.save_adapter(
        tmp_path, components, method="lora", family="sdxl", hyper={"rank": 2}, embeddings={"<cat>": vectors}
    )
    load_adapter(pipe, tmp_path, name="cat")
    assert describe_adapters(pipe)[0]["tokens"] == ["<cat>"] and describe_adapters(pipe)[0]["components"] == ["unet"]
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        assert tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1"]) == [1000, 1001]
    torch.testing.assert_close(pipe.text_encoder_2.get_input_embeddings().weight[1000:], vectors["text_encoder_2"])
    unload_adapter(pipe)
    assert (pipe.tokenizer, pipe.tokenizer_2) == tokenizers


@pytest.mark.parametrize("algo", ["lokr", pytest.param("loha", marks=pytest.mark.slow)])
def test_a_file_lycoris_wrote_gives_lycoris_outputs(tiny_pipelines, tmp_path, algo):
    """LyCORIS's own create_lycoris + save_weights (kohya `lora_unet_` names): our UNet output equals the
    LyCORIS-wrapped UNet's."""
    import copy
    import logging

    lycoris = pytest.importorskip("lycoris")
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    network_class = lycoris.LycorisNetwork
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    unet = copy.deepcopy(pipe.unet)
    presets = ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "ENABLE_CONV")
    saved = {key: getattr(network_class, key) for key in presets}
    try:  # the preset is class state: put it back for everyone else
        network_class.apply_preset({"target_module": ["Attention"], "lora_prefix": "lora_unet"})
        network = lycoris.create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=1, algo=algo, factor=4)
    finally:
        for key, value in saved.items():
            setattr(network_class, key, value)
    network.apply_to()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for parameter in network.parameters():
            parameter.normal_(0, 0.3)
    network.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, None)
    sample, states = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = unet(sample, 10, states).sample
        load_adapter(pipe, tmp_path / "lyco.safetensors")
        got = pipe.unet(sample, 10, states).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a1111_embedding_file_uses_its_file_name_as_the_trigger(tiny_pipelines, tmp_path):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    learned = torch.randn(3, 32)
    formats.save_adapter(
        tmp_path,
        {},
        method="textual_inversion",
        family="sd1",
        hyper={},
        embeddings={"<sks>": {"text_encoder": learned}},
    )
    load_adapter(pipe, tmp_path / "a1111" / "sks.safetensors")
    assert describe_adapters(pipe)[0]["tokens"] == ["sks"]
    ids = pipe.tokenizer.convert_tokens_to_ids(["sks", "sks_1", "sks_2"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], learned)
