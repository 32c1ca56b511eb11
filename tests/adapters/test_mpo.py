"""MPO: an exact decomposition, zero change at step 0, only the auxiliary tensors train, own file round trip."""

import pytest
import torch

from personalize import adapters
from personalize.adapters.mpo import _grouped, _ungrouped, contract, decompose, outer_factors, project
from personalize.errors import UserError
from personalize.models import build_tiny

from .llm_training import steps


def test_the_decomposition_is_exact_and_the_central_tensor_holds_most_of_w():
    weight = torch.randn(48, 64, dtype=torch.float64)
    outs, ins = outer_factors(48, 16), outer_factors(64, 16)
    assert outs == (2, 12, 2) and ins == (4, 4, 4)
    grouped = _grouped(weight, outs, ins)
    left, central, right = decompose(grouped)
    torch.testing.assert_close(_ungrouped(contract(left, central, right), outs, ins), weight)
    torch.testing.assert_close(project(grouped, left, right), central)  # C comes back from W by projection
    assert central.numel() > 4 * (left.numel() + right.numel())


def test_mpo_trains_only_the_auxiliary_tensors_and_reloads_from_its_own_file(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    inputs = tokenizer(["what is two"], return_tensors="pt")
    before = model(**inputs).logits.detach()
    adapters.inject(model, "mpo", targets="all-linear", factor=4)
    torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)  # dW = 0 at step 0
    losses, moved = steps(model, tokenizer, count=6, lr=1e-2)
    assert losses[-1] < losses[0]
    assert moved and {key.rsplit(".", 1)[-1] for key in moved} == {"mpo_left", "mpo_right"}
    adapters.save_native(tmp_path, model, "default", "mpo", {"factor": 4})
    fresh = build_tiny("tiny-llama")[0]
    assert adapters.load_native(fresh, tmp_path) == "mpo"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)
    merged = adapters.merge(fresh)
    assert merged and torch.allclose(fresh(**inputs).logits, model(**inputs).logits, atol=1e-4)


def test_a_folder_without_our_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="personalize_adapter.safetensors"):
        adapters.load_native(build_tiny("tiny-llama")[0], tmp_path)
