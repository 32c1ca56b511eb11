"""Ladder Side-Tuning: the backbone builds no graph, only the side network trains; cached generation agrees."""

import pytest
import torch

from personalize import adapters
from personalize.errors import UserError
from personalize.models import build_tiny

from .llm_training import steps


def test_ladder_trains_the_side_network_only_and_reloads(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    inputs = tokenizer(["what is two"], return_tensors="pt")
    before = model(**inputs).logits.detach()
    adapters.inject(model, "ladder", reduction=2)
    torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)  # W_up = 0 at step 0
    losses, moved = steps(model, tokenizer, count=8, lr=1e-2)
    assert losses[-1] < losses[0] and moved and all("personalize_prompts" in key for key in moved)
    adapters.save_native(tmp_path, model, "default", "ladder", {"reduction": 2})
    fresh = build_tiny("tiny-llama")[0]
    assert adapters.load_native(fresh, tmp_path) == "ladder"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)


def test_no_gradient_reaches_the_backbone_activations():
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "ladder", reduction=2)
    seen = []
    model.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(out))
    model(**tokenizer(["what is two"], return_tensors="pt")).logits.sum().backward()
    assert not seen[0].requires_grad  # the backbone ran without building a graph
    assert all(p.grad is not None for p in adapters.trainable_parameters(model) if p.dim() == 2)


def test_cached_generation_equals_full_forward_passes():
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "ladder", reduction=2)
    with torch.no_grad():
        for param in adapters.trainable_parameters(model):
            param.add_(0.1 * torch.randn(param.shape))
        prompt = tokenizer("what is two", return_tensors="pt")["input_ids"]
        ids = prompt
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        options = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
    assert generated.tolist() == ids.tolist()


def test_a_reduction_that_does_not_divide_the_heads_is_one_clear_error():
    with pytest.raises(UserError, match="must divide"):
        adapters.inject(build_tiny("tiny-llama")[0], "ladder", reduction=3)
