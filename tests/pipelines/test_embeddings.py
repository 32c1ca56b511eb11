"""Textual Inversion embeddings: registered in tokenizer(s) and text encoder(s), removed exactly on unload."""

from types import SimpleNamespace

import pytest
import torch
from pipeline_helpers import latents, pipeline_copy, random_components, same_state, snapshot

from personalize.errors import UserError
from personalize.pipelines import describe_adapters, load_adapter, unload_adapter

PROMPT = "a photo of <cat>"


def adapter_file(components=None, embeddings=None):
    """What personalize.formats.read_adapter returns (an AdapterFile), built in memory."""
    return SimpleNamespace(components=components or {}, embeddings=embeddings or {}, metadata={})


def vectors(count, width, seed):
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def test_multi_vector_token_equals_stock_diffusers_and_unloads_exactly(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    tokenizer, embedding, text_encoder = (
        pipe.tokenizer,
        pipe.text_encoder.get_input_embeddings(),
        snapshot(pipe.text_encoder),
    )
    learned = vectors(2, 32, seed=1)
    stock = pipeline_copy(tiny_pipelines, "tiny-sd15")
    stock.load_textual_inversion({"<cat>": learned})
    load_adapter(pipe, adapter_file(embeddings={"<cat>": {"text_encoder": learned}}), name="cat")
    assert pipe.tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1"]) == [1000, 1001]
    assert describe_adapters(pipe)[0]["tokens"] == ["<cat>"]
    got = latents(pipe, PROMPT)
    torch.testing.assert_close(got, latents(stock, PROMPT), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, latents(pipe, "a photo of"), atol=1e-3)
    unload_adapter(pipe, "cat")
    assert pipe.tokenizer is tokenizer and len(tokenizer) == 1000
    assert pipe.text_encoder.get_input_embeddings() is embedding and pipe.text_encoder.config.vocab_size == 1000
    assert same_state(pipe.text_encoder, text_encoder)


def test_sdxl_embedding_with_lora_weights_in_one_adapter(tiny_pipelines, base_latents):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sdxl")
    weights = random_components(pipe, "lora", ("unet",), std=0.2, rank=2)
    embeddings = {"<cat>": {"text_encoder": vectors(1, 32, 2), "text_encoder_2": vectors(1, 32, 3)}}
    stock = pipeline_copy(tiny_pipelines, "tiny-sdxl")
    for component, tensor in embeddings["<cat>"].items():
        suffix = component.removeprefix("text_encoder")
        stock.load_textual_inversion(
            {"<cat>": tensor}, tokenizer=getattr(stock, "tokenizer" + suffix), text_encoder=getattr(stock, component)
        )
    load_adapter(pipe, adapter_file(embeddings=embeddings), name="ti")
    torch.testing.assert_close(latents(pipe, PROMPT), latents(stock, PROMPT), rtol=1e-5, atol=1e-5)
    load_adapter(pipe, adapter_file(weights, {"<dog>": {"text_encoder_2": vectors(3, 32, 4)}}), name="both")
    assert len(pipe.tokenizer) == 1001 and len(pipe.tokenizer_2) == 1004
    unload_adapter(pipe, "ti")  # the other adapter's token keeps working, at its new id
    assert len(pipe.tokenizer) == 1000 and pipe.tokenizer_2.convert_tokens_to_ids("<dog>_2") == 1002
    unload_adapter(pipe)
    assert len(pipe.tokenizer_2) == 1000 and pipe.text_encoder_2.get_input_embeddings().num_embeddings == 1000
    assert torch.equal(latents(pipe), base_latents("tiny-sdxl"))


def test_embedding_errors_change_nothing(tiny_pipelines):
    pipe = pipeline_copy(tiny_pipelines, "tiny-sd15")
    tokenizer = pipe.tokenizer
    load_adapter(pipe, adapter_file(embeddings={"<cat>": {"text_encoder": vectors(1, 32, 1)}}), name="cat")
    with pytest.raises(UserError, match="token '<cat>' is already in tokenizer"):
        load_adapter(pipe, adapter_file(embeddings={"<cat>": {"text_encoder": vectors(1, 32, 1)}}))
    word = next(token for token in tokenizer.get_vocab() if token.endswith("</w>"))
    with pytest.raises(UserError, match="already in tokenizer"):
        load_adapter(pipe, adapter_file(embeddings={word: {"text_encoder": vectors(1, 32, 1)}}))
    with pytest.raises(UserError, match=r"shape \(1, 768\).*width 32"):
        load_adapter(pipe, adapter_file(embeddings={"<dog>": {"text_encoder": vectors(1, 768, 1)}}))
    with pytest.raises(UserError, match="text_encoder_2, which this StableDiffusionPipeline does not have"):
        load_adapter(pipe, adapter_file(embeddings={"<dog>": {"text_encoder_2": vectors(1, 32, 1)}}))
    assert len(pipe.tokenizer) == 1001 and [row["name"] for row in describe_adapters(pipe)] == ["cat"]
    unload_adapter(pipe)
    assert pipe.tokenizer is tokenizer
