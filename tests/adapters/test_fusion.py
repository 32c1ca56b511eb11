"""AdapterFusion over two trained Pfeiffer adapters: only the fusion weights train; folder round trip."""

import pytest
import torch

from personalize import adapters
from personalize.errors import UserError
from personalize.models import build_tiny

from .llm_training import steps

TASK_TEXTS = {"colors": ["red is a color", "blue is a color"], "numbers": ["one is a number", "two is a number"]}


def test_fusion_attends_over_frozen_task_adapters_and_reloads(tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    for task in TASK_TEXTS:
        adapters.inject(model, "pfeiffer", name=task)
    for task, texts in TASK_TEXTS.items():  # each task adapter alone on its data
        other = next(t for t in TASK_TEXTS if t != task)
        adapters.set_scale(model, other, 0.0)
        steps(model, tokenizer, count=4, lr=2e-2, name=task, texts=texts)
        adapters.set_scale(model, other, 1.0)
    tasks = {
        k: v.clone() for k, v in model.state_dict().items() if ".adapters.colors." in k or ".adapters.numbers." in k
    }
    adapters.inject(model, "fusion", name="fusion", adapters=["colors", "numbers"])
    assert [p.requires_grad for p in adapters.trainable_parameters(model)] and all(
        not p.requires_grad for n, p in model.named_parameters() if ".adapters.colors." in n
    )
    losses, moved = steps(
        model, tokenizer, count=6, lr=1e-2, name="fusion", texts=[*TASK_TEXTS["colors"], "one is a number"]
    )
    assert losses[-1] < losses[0] and moved and all(".adapters.fusion." in key for key in moved)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tasks.items())  # task adapters untouched
    for task in TASK_TEXTS:
        adapters.save_native(tmp_path / task, model, task, "pfeiffer", {})
    adapters.save_native(tmp_path, model, "fusion", "fusion", {"adapters": ["colors", "numbers"]})
    fresh = build_tiny("tiny-llama")[0]
    assert adapters.load_native(fresh, tmp_path, name="fusion") == "fusion"
    inputs = tokenizer(["red is a"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)


def test_fusion_without_its_task_adapters_is_one_clear_error():
    model, _ = build_tiny("tiny-llama")
    adapters.inject(model, "pfeiffer", name="colors")
    with pytest.raises(UserError, match="has no adapter 'numbers'"):
        adapters.inject(model, "fusion", name="fusion", adapters=["colors", "numbers"])
