"""Weights read from their safetensors files: remap after caching, and one-at-a-time reads for quantizing."""

from __future__ import annotations

import pytest
import torch

from personalize.models import build_tiny, load_pipeline, save_tiny
from personalize.models.mapped import remap, tensor_reader, weight_files


@pytest.fixture(scope="module")
def saved_sd15(tmp_path_factory):
    return save_tiny("tiny-sd15", tmp_path_factory.mktemp("mapped") / "sd15")


@pytest.fixture
def pipe(saved_sd15):
    pipe = load_pipeline(str(saved_sd15))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


def test_weight_files_are_the_component_files(pipe, saved_sd15):
    assert weight_files(pipe.vae) == [saved_sd15 / "vae" / "diffusion_pytorch_model.safetensors"]
    assert weight_files(pipe.text_encoder) == [saved_sd15 / "text_encoder" / "model.safetensors"]
    built = build_tiny("tiny-sd15")  # built in code: no files behind it
    assert weight_files(built.vae) is None and tensor_reader(built.unet) is None and not remap(built.vae)


def test_reader_returns_every_weight_as_a_fresh_tensor(pipe):
    read = tensor_reader(pipe.unet)
    assert read is not None
    for key, tensor in pipe.unet.state_dict().items():
        fresh = read(key)
        assert torch.equal(fresh, tensor), key
        assert fresh.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()


def test_remap_keeps_outputs_and_points_at_new_storage(pipe):
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    before = pipe.vae.encode(images).latent_dist.mean
    pointer = pipe.vae.encoder.conv_in.weight.data_ptr()
    assert remap(pipe.vae)
    assert pipe.vae.encoder.conv_in.weight.data_ptr() != pointer
    assert not pipe.vae.encoder.conv_in.weight.requires_grad
    assert torch.equal(pipe.vae.encode(images).latent_dist.mean, before)


def test_remap_refuses_a_changed_or_trainable_module(pipe):
    embedding = pipe.text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[-1, -1] += 1.0
    changed = embedding.weight.detach().clone()
    assert not remap(pipe.text_encoder)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, changed)  # the change survives
    pipe.vae.decoder.conv_out.weight.requires_grad_(True)
    assert not remap(pipe.vae)


def test_quantizing_from_disk_equals_quantizing_in_memory(pipe):
    pytest.importorskip("bitsandbytes")
    from personalize.adapters.quant import dequantized_weight
    from personalize.trainers.common.frozen_base import quantize_base

    in_memory = load_pipeline(str(weight_files(pipe.unet)[0].parents[1])).unet
    quantize_base(in_memory, "nf4", torch.float32, from_disk=False)
    quantize_base(pipe.unet, "nf4", torch.float32, from_disk=True)
    layers = dict(pipe.unet.named_modules())
    quantized = [path for path, module in in_memory.named_modules() if type(module).__name__.endswith("4bit")]
    assert any(type(layers[p]).__name__ == "Conv2d4bit" for p in quantized)  # convolutions too
    assert type(layers["conv_in"]) is torch.nn.Conv2d and type(layers["conv_out"]) is torch.nn.Conv2d
    for path in quantized:
        assert torch.equal(dequantized_weight(layers[path]), dequantized_weight(in_memory.get_submodule(path))), path


def test_llm_quantized_from_disk_equals_in_memory_and_trains(tmp_path):
    """QLoRA on a CPU: a saved causal LM loads lazily and each Linear weight is read from its file."""
    pytest.importorskip("bitsandbytes")
    from personalize import adapters
    from personalize.adapters.quant import dequantized_weight
    from personalize.models import load_language_model
    from personalize.trainers.llm.sft import train

    folder = save_tiny("tiny-llama", tmp_path / "llama")
    from_disk, _ = load_language_model(str(folder))
    in_memory, _ = load_language_model(str(folder))
    read = tensor_reader(from_disk)
    assert read is not None and read("no.such.weight") is None
    adapters.quantize(from_disk, "nf4", read_weight=read)
    adapters.quantize(in_memory, "nf4")
    quantized = [path for path, module in in_memory.named_modules() if type(module).__name__ == "Linear4bit"]
    assert quantized
    for path in quantized:
        assert torch.equal(
            dequantized_weight(from_disk.get_submodule(path)), dequantized_weight(in_memory.get_submodule(path))
        )
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n' * 4)
    options = dict(data=str(data), steps=2, lr=1e-2, checkpoint_every=0, sample_prompts=["hi"], max_new_tokens=1)
    for precision in ("no", "bf16"):  # bf16: what stays unquantized is cast from the checkpoint's fp32
        out = str(tmp_path / precision)
        result = train(model=str(folder), quantize="nf4", mixed_precision=precision, output=out, **options)
        assert result.metrics["final_loss"] == result.metrics["final_loss"]  # not NaN
