"""PASTA: only the special tokens' hidden states change; trains, switches off, reloads from its own file."""

import pytest
import torch

from personalize import adapters
from personalize.errors import UserError
from personalize.models import build_tiny

from .llm_training import steps


def test_pasta_moves_only_special_token_positions_and_trains(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    bos = model.config.bos_token_id
    ids = torch.tensor([[bos, 5, 6, bos, 7]])
    late = torch.tensor([[5, 6, 7, bos]])  # causal attention: only the last position can see the BOS
    base_hidden = model(input_ids=late, output_hidden_states=True).hidden_states[1].detach()
    adapters.inject(model, "pasta", special_ids=[bos])
    assert [tuple(p.shape) for p in adapters.trainable_parameters(model)] == [(2, 1, 32)]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, build_tiny("tiny-llama")[0](input_ids=ids).logits)
        adapters.trainable_parameters(model)[0].normal_()
        # after the first layer only the special position's hidden state differs
        hidden = model(input_ids=late, output_hidden_states=True).hidden_states[1]
        changed = (hidden - base_hidden).abs().amax(-1)[0] > 1e-6
        assert changed.tolist() == [False, False, False, True]
        adapters.set_scale(model, "default", 0.0)
        torch.testing.assert_close(model(input_ids=ids).logits, build_tiny("tiny-llama")[0](input_ids=ids).logits)
        adapters.set_scale(model, "default", 1.0)
        adapters.trainable_parameters(model)[0].zero_()
    chats = [  # the chat template's special tokens around each turn
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in (("what is one", "one is a number"), ("what is red", "red is a color"))
    ]
    losses, moved = steps(model, tokenizer, count=8, lr=5e-2, texts=chats)
    assert losses[-1] < losses[0] and moved and all("personalize_prompts" in key for key in moved)
    adapters.save_native(tmp_path, model, "default", "pasta", {"special_ids": [bos]})
    fresh = build_tiny("tiny-llama")[0]
    assert adapters.load_native(fresh, tmp_path) == "pasta"
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_pasta_without_decoder_layers_is_one_clear_error():
    with pytest.raises(UserError, match="decoder layers"):
        adapters.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), "pasta")
