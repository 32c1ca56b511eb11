"""LLM adapters in the peft layout: stock peft loads what we write, with identical logits.

Covers every method `personalize train --data` offers, including prompt and prefix tuning (the
injection core's forward hook), and our own reader (`personalize generate --adapter`)."""

import pytest
import torch

from personalize import adapters
from personalize.models import build_tiny
from personalize.pipelines.text import attach_adapter
from personalize.trainers.llm.outputs import save_adapter

peft = pytest.importorskip("peft")

CASES = {
    "lora": dict(targets="all-linear", rank=4, alpha=8),
    "dora": dict(targets="attention", rank=4, alpha=4),
    "loha": dict(targets="attention", rank=4, alpha=2),
    "lokr": dict(targets="all-linear", rank=2, alpha=2),
    "ia3": dict(targets=["q_proj", "v_proj", "down_proj"]),
    "prompt-tuning": dict(num_virtual_tokens=3),
    "prefix-tuning": dict(num_virtual_tokens=3),
}


def _trained(method):
    """tiny-llama with a `method` adapter whose weights are random (as if trained)."""
    model, tokenizer = build_tiny("tiny-llama")
    options = dict(CASES[method])
    adapters.inject(model, method, **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapters.trainable_parameters(model):
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    hyper = {k: v for k, v in options.items() if k != "targets"}
    return model, tokenizer, hyper


@pytest.mark.parametrize("method", list(CASES))
def test_stock_peft_loads_our_adapter_with_identical_logits(method, tmp_path):
    ours, tokenizer, hyper = _trained(method)
    files = save_adapter(tmp_path, ours, adapters.state_dict(ours), method=method, hyper=hyper, base_model="tiny-llama")
    assert sorted(path.name for path in files) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(build_tiny("tiny-llama")[0], str(tmp_path)).eval()
    mine = build_tiny("tiny-llama")[0]
    assert attach_adapter(mine, tmp_path) == method
    inputs = tokenizer(["what is two", "red is a color"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = ours(**inputs).logits
        untouched = build_tiny("tiny-llama")[0](**inputs).logits
        torch.testing.assert_close(theirs(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
    assert (expected[:, -untouched.shape[1] :] - untouched).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_prompt_adapters_generate_consistently(method, tmp_path):
    """generate (with the cache) equals greedy decoding by full forward passes (no cache).

    peft's prompt tuning generates the same tokens; peft's prefix tuning does not: its generate
    numbers the real tokens from 0 while its forward (and training) numbers them after the prefix."""
    ours, tokenizer, hyper = _trained(method)
    prompt = tokenizer("what is two", return_tensors="pt")["input_ids"]
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            next_id = ours(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        options = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = ours.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
    assert generated.tolist() == ids.tolist()
    if method == "prompt-tuning":
        save_adapter(tmp_path, ours, adapters.state_dict(ours), method=method, hyper=hyper, base_model="tiny-llama")
        theirs = peft.PeftModel.from_pretrained(build_tiny("tiny-llama")[0], str(tmp_path)).eval()
        with torch.no_grad():
            assert theirs.generate(input_ids=prompt, **options).tolist() == ids.tolist()


def test_prompt_adapter_api_is_merge_free_and_removable():
    model, tokenizer = build_tiny("tiny-llama")
    inputs = tokenizer("what is two", return_tensors="pt")
    before = model(**inputs).logits
    paths = adapters.inject(model, "prefix-tuning", name="p", num_virtual_tokens=2)
    assert paths == ["personalize_prompts.p"]
    assert [tuple(p.shape) for p in adapters.trainable_parameters(model)] == [(2, 2 * 2 * 2 * 8)]
    assert sum(p.requires_grad for p in model.parameters()) == 1
    with pytest.raises(Exception, match="no weights to merge"):
        adapters.merge(model, "p")
    adapters.set_scale(model, "p", 0.0)
    torch.testing.assert_close(model(**inputs).logits, before)
    adapters.set_scale(model, "p", 1.0)
    assert not torch.allclose(model(**inputs).logits, before)
    adapters.remove(model, "p")
    torch.testing.assert_close(model(**inputs).logits, before)
    assert "personalize_prompts" not in dict(model.named_children())
