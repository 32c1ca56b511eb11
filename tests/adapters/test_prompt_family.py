"""P-tuning and LLaMA-Adapter on tiny-llama: training, stock peft loads them, one step's gradients as peft's."""

import pytest
import torch

from personalize import adapters
from personalize.errors import UserError
from personalize.models import build_tiny
from personalize.trainers.llm.outputs import save_adapter

from .llm_training import TEXTS, peft_logits_match, steps

peft = pytest.importorskip("peft")
CASES = {
    "p-tuning": dict(num_virtual_tokens=3, encoder_hidden_size=16),
    "p-tuning-lstm": dict(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
    "llama-adapter": dict(adapter_len=3, adapter_layers=1),
}
PEFT_CONFIGS = {
    "p-tuning": lambda: peft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"),
    "p-tuning-lstm": lambda: peft.PromptEncoderConfig(
        num_virtual_tokens=3, encoder_hidden_size=8, encoder_reparameterization_type="LSTM", task_type="CAUSAL_LM"
    ),
    "llama-adapter": lambda: peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM"),
}


def _method(case):
    return case.removesuffix("-lstm")


@pytest.mark.parametrize("case", list(CASES))
def test_trains_only_its_own_parameters_and_starts_as_the_base(case):
    model, tokenizer = build_tiny("tiny-llama")
    inputs = tokenizer(["what is two"], return_tensors="pt")
    before = model(**inputs).logits.detach()
    adapters.inject(model, _method(case), **CASES[case])
    if case == "llama-adapter":  # zero-init gate: the model is unchanged at step 0
        torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)
    frozen = {key: value.clone() for key, value in model.state_dict().items() if "personalize_prompts" not in key}
    losses, _ = steps(model, tokenizer, count=8, lr=1e-2)
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_stock_peft_loads_it_with_identical_logits(case, tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, _method(case), **CASES[case])
    with torch.no_grad():
        for param in adapters.trainable_parameters(model):
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
    model.eval()
    hyper = {k: v for k, v in CASES[case].items()}
    save_adapter(tmp_path, model, adapters.state_dict(model), method=_method(case), hyper=hyper, base_model="t")
    theirs = peft.PeftModel.from_pretrained(build_tiny("tiny-llama")[0], str(tmp_path)).eval()
    peft_logits_match(model, theirs, tokenizer)
    mine = build_tiny("tiny-llama")[0]  # and our core reads it back
    adapters.inject(mine, _method(case), **CASES[case])
    adapters.load_state_dict(mine, adapters.state_dict(model))
    peft_logits_match(model, mine.eval(), tokenizer)


def _peft_names(case, key):
    """Our parameter name -> peft's, for the same tensor."""
    if case == "llama-adapter":
        return key  # filled in below from the path order
    return "prompt_encoder.default." + key.split(".", 2)[2]


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_gradients_match_peft(case):
    theirs = peft.get_peft_model(build_tiny("tiny-llama")[0], PEFT_CONFIGS[case]())
    ours, tokenizer = build_tiny("tiny-llama")
    adapters.inject(ours, _method(case), **CASES[case])
    mine = [(k, p) for k, p in ours.named_parameters() if p.requires_grad]
    peers = [(k, p) for k, p in theirs.named_parameters() if p.requires_grad]
    if case == "llama-adapter":  # ours: prompts.0, gates.0; peft: adaption_prompt, adaption_gate
        peers = sorted(peers, key=lambda kp: "gate" in kp[0])
    else:
        by_name = dict(peers)
        peers = [(k, by_name[_peft_names(case, k)]) for k, _ in mine]
    assert [tuple(p.shape) for _, p in mine] == [tuple(p.shape) for _, p in peers]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (_, a), (_, b) in zip(mine, peers):
            a.copy_(torch.randn(a.shape, generator=generator) * 0.5)
            b.copy_(a)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    theirs(**batch, labels=labels).loss.backward()
    ours(**batch, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(mine, peers):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_llama_adapter_on_a_model_without_llama_attention_is_one_clear_error():
    with pytest.raises(UserError, match="q_proj/k_proj/v_proj/o_proj"):
        adapters.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), "llama-adapter")
