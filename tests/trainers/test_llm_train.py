"""The LLM/VLM recipe end to end on tiny-llama / tiny-llava (offline, CPU)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main
from personalize.models import build_tiny
from personalize.pipelines.text import generate_text, load_text_model
from personalize.trainers.llm.sft import train

QA = [
    ("what is one", "one is a number"),
    ("what is red", "red is a color"),
    ("who is a cat", "a small animal"),
    ("what is the sky", "the sky is blue"),
    ("what is snow", "snow is white"),
    ("what is a dog", "a good dog"),
    ("what is grass", "grass is green"),
    ("what is night", "night is dark"),
    ("what is the sea", "the sea is water"),
    ("what is gold", "gold is yellow"),
]


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    return path


def _answers(model, tokenizer):
    return [generate_text(model, tokenizer, question, max_new_tokens=12) for question, _ in QA]


def test_a_tiny_llama_memorizes_ten_answers(qa_file, tmp_path):
    model, tokenizer = build_tiny("tiny-llama")
    expected = [answer for _, answer in QA]
    assert sum(a == e for a, e in zip(_answers(model, tokenizer), expected)) == 0
    result = train(
        model="tiny-llama",
        data=str(qa_file),
        steps=80,
        lr=1e-2,
        lr_scheduler="constant",
        max_grad_norm=1.0,
        batch_size=10,
        output=str(tmp_path / "out"),
        checkpoint_every=0,
        sample_prompts=["what is one"],
    )
    assert result.samples == {"what is one": "one is a number"}
    trained, tokenizer = load_text_model("tiny-llama", str(tmp_path / "out"))
    assert _answers(trained, tokenizer) == expected
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("PeftModel.from_pretrained") == 1
    # The card's snippet runs as printed and gives the trained model's answers.
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)
    assert _answers(scope["model"], tokenizer) == expected


def test_resumed_run_matches_an_uninterrupted_one(qa_file, tmp_path):
    settings = dict(
        model="tiny-llama", data=str(qa_file), lr=1e-2, lr_scheduler="constant", batch_size=3, checkpoint_every=2
    )
    settings.update(method_options={"dropout": 0.1}, sample_prompts=["hi"], max_new_tokens=1)
    whole = train(steps=5, output=str(tmp_path / "whole"), **settings)
    train(steps=2, output=str(tmp_path / "split"), **settings)  # "interrupted" after the step-2 checkpoint
    resumed = train(steps=5, output=str(tmp_path / "split"), resume=True, **settings)
    first = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    second = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=1e-5)
    assert resumed.metrics["final_loss"] == pytest.approx(whole.metrics["final_loss"], rel=1e-5)


def test_qlora_nf4_trains_on_cpu(qa_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = train(
        model="tiny-llama",
        data=str(qa_file),
        quantize="nf4",
        steps=3,
        lr=1e-2,
        output=str(tmp_path / "q"),
        checkpoint_every=0,
        sample_prompts=["hi"],
        max_new_tokens=2,
    )
    assert all(torch.isfinite(torch.tensor(result.metrics["final_loss"])) for _ in [0])
    weights = load_file(str(tmp_path / "q" / "adapter_model.safetensors"))
    assert all(value.dtype == torch.float32 for value in weights.values())
    assert any("mlp.down_proj.lora_B" in key and value.abs().sum() > 0 for key, value in weights.items())
    config = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "ia3"])
def test_other_methods_train_and_save(method, qa_file, tmp_path):
    result = train(
        model="tiny-llama",
        data=str(qa_file),
        method=method,
        num_virtual_tokens=4,
        steps=2,
        output=str(tmp_path / method),
        checkpoint_every=0,
        sample_prompts=["hi"],
        max_new_tokens=2,
    )
    assert result.metrics["steps"] == 2
    config = json.loads((tmp_path / method / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper().replace("-", "_")


def test_packing_with_gradient_checkpointing(qa_file, tmp_path, capsys):
    result = train(
        model="tiny-llama",
        data=str(qa_file),
        packing=True,
        max_length=64,
        gradient_checkpointing=True,
        steps=2,
        batch_size=2,
        output=str(tmp_path / "packed"),
        checkpoint_every=0,
        sample_prompts=["hi"],
        max_new_tokens=2,
    )
    assert result.metrics["steps"] == 2
    assert "in 4 packed rows" in capsys.readouterr().out  # 10 conversations of ~22 tokens in 64-token rows


def _image_file(path, color):
    from PIL import Image

    Image.new("RGB", (40, 32), color).save(path)
    return path.name


def test_vlm_trains_on_images_and_skips_unreadable_ones(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    lines = [
        {"image": _image_file(tmp_path / "red.png", "red"), "prompt": "what is this", "completion": "red"},
        {
            "image": _image_file(tmp_path / "blue.png", "blue"),
            "messages": [{"role": "user", "content": "<image>\nwhat color"}, {"role": "assistant", "content": "blue"}],
        },
        {"image": "broken.jpg", "prompt": "what is this", "completion": "nothing"},
    ]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = tmp_path / "vlm.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = train(
        model="tiny-llava",
        data=str(data),
        train_projector=True,
        steps=2,
        batch_size=2,
        lr=1e-2,
        output=str(tmp_path / "out"),
        checkpoint_every=0,
        max_new_tokens=2,
    )
    assert "line 3:" in result.metrics["data"] and "2 conversations" in result.metrics["data"]
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any("multi_modal_projector" in key for key in weights)
    assert not any("vision_tower" in key for key in weights)
    # stock peft loads it onto a stock LLaVA with the same logits as our reader
    model, processor = build_tiny("tiny-llava")
    theirs = peft.PeftModel.from_pretrained(model, str(tmp_path / "out")).eval()
    ours, _ = load_text_model("tiny-llava", str(tmp_path / "out"))
    from PIL import Image

    from personalize.pipelines.text import model_inputs

    inputs = model_inputs(processor, "what is this", image=Image.open(tmp_path / "red.png"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_cli_trains_and_generates_text(qa_file, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train", "--preset", "tiny-llama", "--data", str(qa_file), "--steps", "2", "--output", str(out)])
    assert code == 0 and (out / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-llama", "--adapter", str(out), "--prompt", "what is one"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["train", "--model", "tiny-llama", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{broken\n")
    assert main(["train", "--model", "tiny-llama", "--data", str(empty), "--output", str(tmp_path / "e")]) == 2
    assert "line 1" in capsys.readouterr().err


def test_cli_generates_about_an_image(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (50, 40), "red").save(tmp_path / "red.png")
    command = ["generate", "--model", "tiny-llava", "--prompt", "what is this", "--max-new-tokens", "3"]
    assert main([*command, "--image", str(tmp_path / "red.png")]) == 0
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--image", str(tmp_path / "red.png")]) == 2
    assert "vision-language model" in capsys.readouterr().err
