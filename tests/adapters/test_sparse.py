"""FISH mask, Child-Tuning and Diff-Pruning: the chosen entries train, nothing else; sparse storage."""

import pytest
import torch
from safetensors.torch import load_file

from personalize import adapters
from personalize.adapters.layer import AdapterLayer
from personalize.errors import UserError
from personalize.models import build_tiny

from .llm_training import TEXTS, steps


def _batches(tokenizer, count=2):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return [batch] * count


def _modules(model):
    return [m.adapters["default"] for m in model.modules() if isinstance(m, AdapterLayer)]


def _effective(model):
    """Per wrapped layer, the entries whose weight moved: M (.) D != 0."""
    return {id(m): (m.delta_weight() != 0) for m in _modules(model)}


@pytest.mark.parametrize("method", ["fish-mask", "child-tuning"])
def test_fisher_chosen_entries_are_the_only_ones_that_move(method, tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, method, targets="all-linear", density=0.05)
    assert adapters.calibrate(model, lambda batch: model(**batch).loss, _batches(tokenizer))
    masks = [m.mask.clone() for m in _modules(model)]
    total = sum(mask.numel() for mask in masks)
    assert sum(int(mask.sum()) for mask in masks) == round(0.05 * total)  # global top 5%
    losses, moved = steps(model, tokenizer, count=6, lr=1e-2)
    assert losses[-1] < losses[0] and all(".adapters.default." in key for key in moved)
    for module, mask in zip(_modules(model), masks):
        assert not (module.delta_weight() != 0)[~mask].any()  # outside the mask: no change
    adapters.save_native(tmp_path, model, "default", method, {"density": 0.05})
    stored = load_file(str(tmp_path / "personalize_adapter.safetensors"))
    assert sum(v.numel() for k, v in stored.items() if k.endswith("sparse_value")) == round(0.05 * total)
    fresh = build_tiny("tiny-llama")[0]
    adapters.load_native(fresh, tmp_path)
    inputs = tokenizer(["what is two"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)


def test_fisher_mask_prefers_the_entries_with_large_gradients():
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "fish-mask", targets=["lm_head"], density=0.01)
    adapters.calibrate(model, lambda batch: model(**batch).loss, _batches(tokenizer, 1))
    mask = _modules(model)[0].mask
    model2, _ = build_tiny("tiny-llama")
    model2.lm_head.weight.requires_grad_(True)
    model2(**_batches(tokenizer, 1)[0]).loss.backward()
    fisher = model2.lm_head.weight.grad**2
    assert fisher[mask].min() >= fisher[~mask].max()


def test_child_tuning_f_updates_a_random_subset_each_step():
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "child-tuning", targets=["lm_head"], density=0.2, mode="f")
    steps(model, tokenizer, count=1, lr=1e-2)
    moved = _modules(model)[0].delta_weight() != 0
    assert 0.1 < moved.float().mean() < 0.3  # about density of the entries, after one step


def test_diff_pruning_ends_at_its_density_with_the_l0_penalty_in_the_loss(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "diff-pruning", targets="attention", density=0.02)
    assert adapters.regularization(model) is not None
    losses, moved = steps(model, tokenizer, count=6, lr=1e-2)
    assert losses[-1] < losses[0] and all(".adapters.default." in key for key in moved)
    adapters.finish(model)
    nonzero = sum(int((m.delta_weight() != 0).sum()) for m in _modules(model))
    total = sum(m.mask.numel() for m in _modules(model))
    assert 0 < nonzero <= round(0.02 * total)
    adapters.save_native(tmp_path, model, "default", "diff-pruning", {"density": 0.02})
    fresh = build_tiny("tiny-llama")[0]
    adapters.load_native(fresh, tmp_path)
    inputs = tokenizer(["what is two"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)


def test_density_out_of_range_is_one_clear_error():
    with pytest.raises(UserError, match="density must be in"):
        adapters.inject(build_tiny("tiny-llama")[0], "fish-mask", density=1.5)
