"""A few optimizer steps of an injected adapter on tiny-llama: the loss, and which tensors moved."""

import torch

from personalize import adapters

TEXTS = ["what is one: one is a number", "what is red: red is a color"]


def steps(model, tokenizer, count=8, lr=1e-2, name=None, texts=TEXTS):
    """Train adapter `name` (all when None) for `count` AdamW steps on two sentences.

    Returns (losses, moved): the task losses per step and the names (model.state_dict keys) that changed."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(model, name), lr=lr)
    adapters.follow_optimizer(model, optimizer)
    losses = []
    model.train()
    for _ in range(count):
        loss = model(**batch, labels=labels).loss
        penalty = adapters.regularization(model)
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    after = model.state_dict()
    moved = {key for key, value in after.items() if key in before and not torch.equal(value, before[key])}
    return losses, moved


def peft_logits_match(ours, theirs, tokenizer):
    inputs = tokenizer(["what is two", "red is a color"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=1e-4)
