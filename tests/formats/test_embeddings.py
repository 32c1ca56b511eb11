"""Textual Inversion files: diffusers, SDXL clip_l/clip_g and A1111 layouts round trip; pickle needs opt-in."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from personalize.errors import UserError
from personalize.formats import read_adapter, save_adapter


def _embeddings(sdxl: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    parts = {"text_encoder": torch.randn(2, 32, generator=generator)}
    if sdxl:
        parts["text_encoder_2"] = torch.randn(2, 32, generator=generator)
    return {"<sks>": parts}


@pytest.mark.parametrize(("name", "family"), [("tiny-sd15", "sd1"), ("tiny-sdxl", "sdxl")])
def test_embedding_files_round_trip(tiny_pipelines, tmp_path, name, family):
    pipe = tiny_pipelines(name)
    embeddings = _embeddings(family == "sdxl")
    files = save_adapter(tmp_path, {}, method="textual_inversion", family=family, hyper={}, embeddings=embeddings)
    names = {f.relative_to(tmp_path).as_posix() for f in files}
    assert "learned_embeds.safetensors" in names and "a1111/sks.safetensors" in names
    read = read_adapter(tmp_path, pipe)
    assert read.layout == "embedding"
    for component, tensor in embeddings["<sks>"].items():
        assert torch.equal(read.embeddings["<sks>"][component], tensor)
    export = read_adapter(tmp_path / "a1111" / "sks.safetensors", pipe)
    assert set(export.embeddings) == {"sks"}
    for component, tensor in embeddings["<sks>"].items():
        assert torch.equal(export.embeddings["sks"][component], tensor)
    if family == "sdxl":
        assert set(load_file(tmp_path / "a1111" / "sks.safetensors")) == {"clip_l", "clip_g"}
        assert (tmp_path / "learned_embeds_2.safetensors").is_file()


def test_stock_diffusers_loads_our_learned_embeds(tiny_pipelines, tmp_path):
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    save_adapter(tmp_path, {}, method="textual_inversion", family="sd1", hyper={}, embeddings=_embeddings(False))
    pipe.load_textual_inversion(tmp_path / "learned_embeds.safetensors")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>"])[0]
    assert ids != pipe.tokenizer.unk_token_id
    row = pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(row, _embeddings(False)["<sks>"]["text_encoder"][0])


def test_a1111_pickle_needs_opt_in_and_reads_with_weights_only(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines("tiny-sd15")
    vectors = torch.randn(3, 32)
    torch.save({"string_to_param": {"*": vectors}, "name": "cat-toy", "step": 100}, tmp_path / "cat-toy.pt")
    with pytest.raises(UserError, match="pickle"):
        read_adapter(tmp_path / "cat-toy.pt", pipe)
    read = read_adapter(tmp_path / "cat-toy.pt", pipe, allow_pickle=True)
    assert torch.equal(read.embeddings["cat-toy"]["text_encoder"], vectors)


def test_wrong_width_is_reported(tiny_pipelines, tmp_path):
    save_file({"<x>": torch.zeros(1, 768)}, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match=r"\(1, 768\).*32 wide"):
        read_adapter(tmp_path / "x.safetensors", tiny_pipelines("tiny-sd15"))
