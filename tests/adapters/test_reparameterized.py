"""AdaLoRA, Delta-LoRA and IncreLoRA on tiny-llama: training, peft's layout, peft's gradients."""

import pytest
import torch

from personalize import adapters
from personalize.adapters.adalora import budget_at
from personalize.models import build_tiny
from personalize.pipelines.text import attach_adapter
from personalize.trainers.llm.outputs import save_adapter

from .llm_training import TEXTS, peft_logits_match, steps

peft = pytest.importorskip("peft")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _randomize(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.trainable_parameters(model):
            param.add_(0.2 * torch.randn(param.shape, generator=generator))


def _load_with_peft(folder):
    return peft.PeftModel.from_pretrained(build_tiny("tiny-llama")[0], str(folder)).eval()


def _adapter_keys(moved):
    return {key for key in moved if ".adapters." not in key}


def test_adalora_trains_only_its_triplets_and_ends_at_the_target_budget():
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "adalora", targets="attention", rank=4, alpha=8, target_rank=2, total_steps=8)
    losses, moved = steps(model, tokenizer, count=8, lr=2e-2)
    assert losses[-1] < losses[0]
    assert moved and not _adapter_keys(moved)  # nothing outside the adapters changed
    kept = [layer.adapters["default"].kept() for _, layer in adapters.inject.__globals__["_layers"](model)]
    assert sum(int(k.sum()) for k in kept) == 2 * len(kept)  # the budget: target_rank per module on average


def test_adalora_loads_in_stock_peft_with_identical_logits(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    hyper = dict(rank=4, alpha=8, target_rank=2, total_steps=8)
    adapters.inject(model, "adalora", targets="attention", **hyper)
    _randomize(model)
    first = next(iter(adapters.state_dict(model)))
    with torch.no_grad():  # a reallocated rank pattern: some triplets pruned, one module down to rank 1
        for key, param in model.named_parameters():
            if key.endswith("lora_E"):
                param[1] = 0.0
                if key.startswith(first.rsplit(".", 1)[0]):
                    param[2:] = 0.0
    save_adapter(tmp_path, model, adapters.state_dict(model), method="adalora", hyper=hyper, base_model="tiny-llama")
    theirs = _load_with_peft(tmp_path)
    peft_logits_match(model, theirs, tokenizer)
    shapes = {k: tuple(v.shape) for k, v in theirs.named_parameters() if "lora_E" in k}
    assert sorted(set(shapes.values())) == [(1, 1), (3, 1)]
    mine = build_tiny("tiny-llama")[0]  # our reader: the same function as the equivalent LoRA
    assert attach_adapter(mine, tmp_path) == "lora"
    peft_logits_match(model, mine.eval(), tokenizer)


def test_adalora_gradients_match_peft():
    theirs = peft.get_peft_model(
        build_tiny("tiny-llama")[0],
        peft.AdaLoraConfig(
            init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=ATTENTION, task_type="CAUSAL_LM"
        ),
    )
    ours, tokenizer = build_tiny("tiny-llama")
    adapters.inject(ours, "adalora", targets=ATTENTION, rank=4, alpha=8, target_rank=2, total_steps=10)
    peft_params = {k.removeprefix("base_model.model.").replace(".default", ""): p for k, p in theirs.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in ours.named_parameters():
            if param.requires_grad:
                twin = peft_params[key.replace(".adapters.default", "")]
                twin.copy_(param if not key.endswith("lora_E") else torch.randn(param.shape, generator=generator))
                param.copy_(twin)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    theirs(**batch, labels=labels).loss.backward()  # peft adds orth_reg_weight * penalty to the loss
    (ours(**batch, labels=labels).loss + adapters.regularization(ours)).backward()
    compared = 0
    for key, param in ours.named_parameters():
        if param.requires_grad:
            twin = peft_params[key.replace(".adapters.default", "")]
            torch.testing.assert_close(param.grad, twin.grad, atol=1e-6, rtol=1e-4)
            compared += 1
    assert compared == 3 * 4 * 2  # A, E, B on 4 projections in 2 layers


@pytest.mark.parametrize("step", [0, 1, 5, 9])
def test_adalora_budget_is_cubic_between_the_warmups(step):
    schedule = {"init_warmup": 1, "final_warmup": 2, "total_steps": 10, "interval": 1}
    budget, _ = budget_at(step, 40, 16, schedule)
    if step <= 1:
        assert budget == 40
    elif step > 8:
        assert budget == 16
    else:
        assert budget == int(24 * (1 - (step - 1) / 7) ** 3 + 16)


def test_delta_lora_equals_moving_the_frozen_weight_by_the_change_of_ba():
    """Our form (a detached extra lambda * s * BAx) against the paper's: W += lambda * s * d(BA) each step."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    x, target = torch.randn(4, 6), torch.randn(4, 5)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 5))
    ours[0].load_state_dict(base.state_dict())
    adapters.inject(ours, "delta-lora", targets="0", rank=2, alpha=2, update_ratio=0.5)
    paper = torch.nn.Sequential(torch.nn.Linear(6, 5))
    paper[0].load_state_dict(base.state_dict())
    adapters.inject(paper, "lora", targets="0", rank=2, alpha=2)
    # the same B A; LoRA's alpha is ours / (1 + lambda)
    weights = {k: v / 1.5 if k.endswith("alpha") else v for k, v in adapters.state_dict(ours).items()}
    adapters.load_state_dict(paper, weights)
    ours_opt = torch.optim.SGD(adapters.trainable_parameters(ours), lr=0.5)
    paper_opt = torch.optim.SGD(adapters.trainable_parameters(paper), lr=0.5)
    lora = paper[0].adapters["default"]
    for _ in range(4):
        for model, optimizer in ((ours, ours_opt), (paper, paper_opt)):
            ((model(x) - target) ** 2).mean().backward()
            before = lora.delta_weight(paper[0].base_layer.weight).detach().clone()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            paper[0].base_layer.weight += 0.5 * (lora.delta_weight(paper[0].base_layer.weight) - before)
        torch.testing.assert_close(ours(x), paper(x), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(paper[0].base_layer.weight, base.weight)  # the paper's W did move


def test_delta_lora_trains_and_saves_as_a_peft_lora(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "delta-lora", targets="all-linear", rank=4, alpha=8, update_ratio=1.0)
    losses, moved = steps(model, tokenizer, count=6)
    assert losses[-1] < losses[0] and moved and not _adapter_keys(moved)
    save_adapter(tmp_path, model, adapters.state_dict(model), method="delta-lora", hyper={}, base_model="tiny-llama")
    peft_logits_match(model, _load_with_peft(tmp_path), tokenizer)


def test_increlora_grows_ranks_and_saves_as_a_peft_lora_with_a_rank_pattern(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    adapters.inject(model, "increlora", targets="attention", rank=1, max_rank=4, interval=2, grow=3)
    losses, moved = steps(model, tokenizer, count=8)
    assert losses[-1] < losses[0] and moved and not _adapter_keys(moved)
    ranks = [int(layer.adapters["default"].active.sum()) for _, layer in adapters.inject.__globals__["_layers"](model)]
    assert sum(ranks) == len(ranks) + 4 * 3  # 4 growth events, 3 modules each
    assert len(set(ranks)) > 1  # grown where it mattered, not everywhere
    save_adapter(tmp_path, model, adapters.state_dict(model), method="increlora", hyper={}, base_model="tiny-llama")
    peft_logits_match(model, _load_with_peft(tmp_path), tokenizer)
