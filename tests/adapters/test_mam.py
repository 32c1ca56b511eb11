"""MAM adapter: prefix + scaled parallel FFN adapter; trains only its own tensors; own file round trip."""

import torch

from personalize import adapters
from personalize.models import build_tiny

from .llm_training import steps


def test_mam_trains_its_prefix_and_ffn_adapters_and_reloads(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "mam", num_virtual_tokens=2, reduction=4)
    names = sorted(adapters.state_dict(model))
    assert names[-1] == "prompt_embeddings" and "model.layers.1.mlp.adapter_up.weight" in names
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "personalize_prompts" not in k}
    losses, _ = steps(model, tokenizer, count=8, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)
    up = model.personalize_prompts["default"].up[0].weight
    assert up.abs().sum() > 0  # the FFN adapter trained, not only the prefix
    adapters.save_native(tmp_path, model, "default", "mam", {"num_virtual_tokens": 2, "reduction": 4})
    fresh = build_tiny("tiny-llama")[0]
    assert adapters.load_native(fresh, tmp_path) == "mam"
    inputs = tokenizer(["what is two"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)
    adapters.remove(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, build_tiny("tiny-llama")[0](**inputs).logits)
