"""`personalize train --method vera|oft|boft --model tiny-llama`: peft's layout, which stock peft loads
with the logits our own loader gives (and our loader reproduces the trained model: test_llm_generate)."""

import json

import pytest
import torch

from personalize.cli import main
from personalize.models import build_tiny
from personalize.pipelines.text import load_text_model

peft = pytest.importorskip("peft")

QA = [("what is one", "one is a number"), ("what is red", "red is a color"), ("what is snow", "snow is white")]
CASES = {
    "vera": ("VERA", ["--rank", "8"]),
    "oft": ("OFT", ["--set", "method_options={block_size: 8}"]),
    "boft": ("BOFT", ["--set", "method_options={block_size: 4}"]),
}


@pytest.mark.parametrize("method", list(CASES))
def test_cli_writes_peft_s_layout_that_stock_peft_loads_with_identical_logits(method, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    peft_type, flags = CASES[method]
    out = tmp_path / "out"
    command = ["train", "--model", "tiny-llama", "--data", str(data), "--method", method, "--steps", "3"]
    command += ["--lr", "2e-2", "--batch-size", "3", "--output", str(out), "--set", "max_new_tokens=1", *flags]
    assert main(command) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["target_modules"]
    theirs = peft.PeftModel.from_pretrained(build_tiny("tiny-llama")[0], str(out)).eval()
    ours, tokenizer = load_text_model("tiny-llama", adapter=str(out))
    inputs = tokenizer(["what is one", "snow is white"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = ours(**inputs).logits
        torch.testing.assert_close(theirs(**inputs).logits, expected, atol=1e-5, rtol=1e-4)
        base = build_tiny("tiny-llama")[0].eval()(**inputs).logits
    assert (expected - base).abs().max() > 1e-4  # three steps moved it: the file holds what was trained
