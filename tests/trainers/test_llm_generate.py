"""Every LLM method's output generates: `personalize train --method NAME` on tiny-llama, then
`personalize generate --adapter OUT` (and `load_text_model(..., adapter=OUT)`) with that folder.

The loaded adapter must reproduce the trained model: its greedy answer equals the one the training run
wrote to samples.txt (the same prompt, from the in-memory trained model), and its logits differ from the
untouched base's. A representative subset runs by default (a weight adapter in peft's layout, our own
file, P-tuning's and LLaMA-Adapter's peft files, a prefix in the cache); the rest is `-m slow`."""

import json

import pytest
import torch

from personalize.cli import main
from personalize.models import build_tiny
from personalize.pipelines.text import load_text_model, model_inputs
from personalize.trainers.llm.config import LLM_METHODS

PROMPT = "what is one"
QA = [("what is one", "one is a number"), ("what is red", "red is a color"), ("what is snow", "snow is white")]
FLAGS = {
    "adalora": ["--rank", "4", "--set", "method_options={target_rank: 2}"],
    "delta-lora": ["--rank", "4", "--set", "method_options={update_ratio: 1.0}"],
    "increlora": ["--rank", "2", "--set", "method_options={interval: 1, grow: 4}"],
    "p-tuning": ["--num-virtual-tokens", "4"],
    "prompt-tuning": ["--num-virtual-tokens", "4"],
    "prefix-tuning": ["--num-virtual-tokens", "4"],
    "llama-adapter": ["--lr", "1e-1", "--set", "method_options={adapter_len: 4}"],
    "compacter": ["--set", "method_options={phm_dim: 2}"],
    "fish-mask": ["--set", "method_options={density: 0.05, calibration_batches: 1}"],
    "child-tuning": ["--set", "method_options={density: 0.2, mode: f}"],
    "diff-pruning": ["--set", "method_options={density: 0.05}"],
    "mam": ["--num-virtual-tokens", "2"],
    "ladder": ["--set", "method_options={reduction: 2}"],
    "unipelt": ["--num-virtual-tokens", "2", "--set", "method_options={rank: 2}"],
    "vera": ["--rank", "8"],
}
DEFAULT = ("lora", "houlsby", "p-tuning", "llama-adapter", "mam", "vera")
METHODS = [m if m in DEFAULT else pytest.param(m, marks=pytest.mark.slow) for m in LLM_METHODS if m != "fusion"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in QA))
    return path


def _train(method, data, out, extra=()):
    command = ["train", "--model", "tiny-llama", "--data", str(data), "--method", method, "--steps", "3"]
    command += ["--lr", "1e-2", "--batch-size", "3", "--output", str(out), "--set", "max_new_tokens=4"]
    command += ["--set", f"sample_prompts=[{PROMPT}]", *FLAGS.get(method, []), *extra]
    assert main(command) == 0
    return (out / "samples.txt").read_text().split(f"### {PROMPT}\n", 1)[1].rstrip("\n")


def _check_generates(out, trained_answer, capsys):
    capsys.readouterr()
    command = ["generate", "--model", "tiny-llama", "--adapter", str(out), "--prompt", PROMPT]
    assert main([*command, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == trained_answer.strip()
    model, tokenizer = load_text_model("tiny-llama", adapter=str(out))
    inputs = model_inputs(tokenizer, PROMPT)
    with torch.no_grad():
        loaded = model(**inputs).logits[:, -1]  # the last position: prompt methods prepend tokens
        base = build_tiny("tiny-llama")[0].eval()(**inputs).logits[:, -1]
    assert (loaded - base).abs().max() > 1e-4  # the adapter is there and does something


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trained_by_the_cli_generates_what_it_learned(method, data, tmp_path, capsys):
    out = tmp_path / method
    _check_generates(out, _train(method, data, out), capsys)


@pytest.mark.slow
def test_a_fusion_run_generates_with_its_task_adapters(data, tmp_path, capsys):
    for task in ("a", "b"):
        _train("pfeiffer", data, tmp_path / task)
    out = tmp_path / "fused"
    tasks = f"method_options={{adapters: [{tmp_path / 'a'}, {tmp_path / 'b'}]}}"
    answer = _train("fusion", data, out, ["--set", tasks])
    _check_generates(out, answer, capsys)


def test_a_folder_of_our_own_file_routes_generate_to_the_language_model_path(tmp_path):
    """`--model` a hub id (not known offline to be a language model) with a native-file folder: text."""
    import argparse

    from personalize.pipelines.cli import _is_text

    (tmp_path / "personalize_adapter.safetensors").write_bytes(b"")
    args = argparse.Namespace(model="someone/a-llama", adapter=[str(tmp_path)], max_new_tokens=None)
    assert _is_text(args)
    assert not _is_text(argparse.Namespace(model="someone/a-llama", adapter=[], max_new_tokens=None))
