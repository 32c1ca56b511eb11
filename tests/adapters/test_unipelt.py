"""UniPELT: gated LoRA + prefix + adapter; every part and gate trains, the base does not; round trip; generate."""

import torch

from personalize import adapters
from personalize.models import build_tiny

from .llm_training import steps


def test_unipelt_trains_all_three_parts_and_their_gates_and_reloads(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "unipelt", num_virtual_tokens=2, rank=2, reduction=4)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "personalize_prompts" not in k}
    before = {k: v.clone() for k, v in adapters.state_dict(model).items()}
    losses, _ = steps(model, tokenizer, count=8, lr=1e-2)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items() if k in frozen)
    after = adapters.state_dict(model)
    for part in (
        "prompt_embeddings",
        "q_up.0",
        "v_up.1",
        "adapter_up.0",
        "gate_lora.0",
        "gate_prefix.1",
        "gate_adapter.0",
    ):
        key = next(k for k in after if part in k)
        assert not torch.equal(after[key], before[key]), key
    adapters.save_native(tmp_path, model, "default", "unipelt", {"num_virtual_tokens": 2, "rank": 2, "reduction": 4})
    fresh = build_tiny("tiny-llama")[0]
    assert adapters.load_native(fresh, tmp_path) == "unipelt"
    inputs = tokenizer(["what is two"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)


def test_unipelt_cached_generation_equals_full_forward_passes_for_the_first_token():
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "unipelt", num_virtual_tokens=2, rank=2, reduction=4)
    with torch.no_grad():
        for param in adapters.trainable_parameters(model):
            param.add_(0.1 * torch.randn(param.shape))
        prompt = tokenizer("what is two", return_tensors="pt")["input_ids"]
        first = model(input_ids=prompt, use_cache=False).logits[:, -1].argmax(-1)
        options = dict(max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
    assert generated[0, -1] == first[0]
