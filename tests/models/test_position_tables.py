"""Loading SD3 without computing the position table its weights hold (personalize/models/position_tables.py)."""

import torch
from safetensors.torch import load_file, save_file

from personalize.models import build_tiny, load_pipeline


def test_loaded_table_is_the_saved_one_and_a_missing_table_is_computed(tmp_path):
    from diffusers import DiffusionPipeline
    from diffusers.models import embeddings

    built = build_tiny("tiny-sd3")
    built.save_pretrained(tmp_path)
    expected = built.transformer.pos_embed.pos_embed
    calls = []
    original = embeddings.get_2d_sincos_pos_embed
    embeddings.get_2d_sincos_pos_embed = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        ours = load_pipeline(str(tmp_path))
        assert calls == []  # nothing computed: the table came from the files
        stock = DiffusionPipeline.from_pretrained(str(tmp_path))
        assert len(calls) == 1
    finally:
        embeddings.get_2d_sincos_pos_embed = original
    assert torch.equal(ours.transformer.pos_embed.pos_embed, expected)
    assert torch.equal(stock.transformer.pos_embed.pos_embed, expected)
    assert embeddings.PatchEmbed.__init__.__name__ == "__init__"  # restored

    weights = next((tmp_path / "transformer").glob("*.safetensors"))
    tensors = load_file(str(weights))
    del tensors["pos_embed.pos_embed"]
    save_file(tensors, str(weights))
    assert torch.equal(load_pipeline(str(tmp_path)).transformer.pos_embed.pos_embed, expected)  # computed after
