"""`personalize train --method NAME` for the survey's LLM/VLM methods, on tiny-llama and tiny-llava.

Each run goes through the CLI; stock peft then loads the written adapter, and its loss on the training
conversations must be below the untouched base's (the adapter learned; the file holds what it learned)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from personalize import adapters
from personalize.cli import main
from personalize.models import build_tiny
from personalize.trainers.llm.chat_data import ChatReport, collate, read_conversations, tokenize

peft = pytest.importorskip("peft")

QA = [("what is one", "one is a number"), ("what is red", "red is a color"), ("what is snow", "snow is white")]
# method -> (peft_type it is saved as; None: personalize's own file, extra CLI flags)
METHODS = {
    "adalora": ("ADALORA", ["--rank", "4", "--set", "method_options={target_rank: 2}"]),
    "delta-lora": ("LORA", ["--rank", "4", "--set", "method_options={update_ratio: 1.0}"]),
    "increlora": ("LORA", ["--rank", "2", "--set", "method_options={interval: 2, grow: 4}"]),
    "mpo": (None, []),
    "p-tuning": ("P_TUNING", ["--num-virtual-tokens", "4", "--lr", "1e-2"]),
    "llama-adapter": ("ADAPTION_PROMPT", ["--lr", "1e-1", "--set", "method_options={adapter_len: 4}"]),
}
METHODS["houlsby"] = (None, ["--lr", "1e-2"])
METHODS["pfeiffer"] = (None, ["--lr", "1e-2"])
METHODS["compacter"] = (None, ["--lr", "1e-2", "--set", "method_options={phm_dim: 2}"])
METHODS["houlsby+adapterdrop"] = (None, ["--lr", "1e-2", "--set", "method_options={drop_below: 1}"])
METHODS["fish-mask"] = (None, ["--lr", "1e-2", "--set", "method_options={density: 0.05, calibration_batches: 1}"])
METHODS["child-tuning"] = (None, ["--lr", "1e-2", "--set", "method_options={density: 0.2, mode: f}"])
METHODS["diff-pruning"] = (None, ["--lr", "1e-2", "--set", "method_options={density: 0.05}"])
METHODS["pasta"] = (None, ["--lr", "5e-2"])
METHODS["mam"] = (None, ["--lr", "1e-2", "--num-virtual-tokens", "2"])
METHODS["ladder"] = (None, ["--lr", "1e-2", "--set", "method_options={reduction: 2}"])
METHODS["unipelt"] = (None, ["--lr", "1e-2", "--num-virtual-tokens", "2", "--set", "method_options={rank: 2}"])
METHODS["vera"] = ("VERA", ["--rank", "8"])
METHODS["oft"] = ("OFT", ["--set", "method_options={block_size: 8}"])
METHODS["boft"] = ("BOFT", ["--set", "method_options={block_size: 4}"])
# the tiny-llava runs take as long again: -m slow (they pass; the default run stays short)
PRESETS = ["tiny-llama", pytest.param("tiny-llava", marks=pytest.mark.slow)]
LLM_ONLY = ("p-tuning", "mam", "unipelt")  # input prompts do not mix with LLaVA's image-token merge


def _image(path, color):
    from PIL import Image

    Image.new("RGB", (40, 32), color).save(path)
    return path.name


def _data(tmp_path, vlm):
    colors = ["red", "blue", "green"]
    lines = [
        {"prompt": q, "completion": a, **({"image": _image(tmp_path / f"{c}.png", c)} if vlm else {})}
        for (q, a), c in zip(QA, colors)
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _loss(model, processor, data, vlm):
    conversations = read_conversations(data, ChatReport())
    if vlm:
        from personalize.trainers.llm.vlm import build_examples, collate_vlm

        examples = build_examples(processor, conversations, 512, ChatReport())
        batch = collate_vlm([[e] for e in examples], processor.tokenizer.pad_token_id or 0)
    else:
        examples = tokenize(processor, conversations, 512)
        batch = collate([[e] for e in examples], processor.pad_token_id or 0)
    labels = batch.pop("labels")
    with torch.no_grad():  # the loss from the logits: peft's AdaLoRA in inference mode fails on labels=
        logits = model(**batch).logits
    logits = logits[:, logits.shape[1] - labels.shape[1] :]  # without virtual-token positions (p-tuning)
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method", list(METHODS))
def test_cli_trains_the_method_and_stock_peft_loads_it(method, preset, tmp_path):
    vlm = preset == "tiny-llava"
    data = _data(tmp_path, vlm)
    peft_type, flags = METHODS[method]
    method = method.split("+")[0]
    if vlm and method in LLM_ONLY:
        assert main(["train", "--model", preset, "--data", str(data), "--method", method]) == 2
        return
    out = tmp_path / "out"
    command = ["train", "--model", preset, "--data", str(data), "--method", method, "--steps", "10"]
    command += ["--lr", "3e-2", "--batch-size", "3", "--set", "lr_scheduler=constant", "--output", str(out)]
    command += ["--set", "max_new_tokens=1", *flags]
    assert main(command) == 0
    base, processor = build_tiny(preset)
    before = _loss(base.eval(), processor, data, vlm)
    if peft_type is None:
        assert not (out / "adapter_config.json").exists()
        trained = build_tiny(preset)[0].eval()
        assert adapters.load_native(trained, out) == method
        if "drop_below" in " ".join(flags):  # AdapterDrop: nothing was put in layer 0
            assert not any(".layers.0." in key for key in adapters.state_dict(trained))
    elif vlm and method == "llama-adapter":  # peft's adaption_prompt knows Llama/Mistral, not LLaVA: our core
        trained = build_tiny(preset)[0].eval()
        adapters.inject(trained, method, adapter_len=4)
        adapters.load_state_dict(
            trained,
            {
                k.removeprefix("base_model.model."): v
                for k, v in load_file(str(out / "adapter_model.safetensors")).items()
            },
        )
    else:
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == peft_type
        trained = peft.PeftModel.from_pretrained(build_tiny(preset)[0], str(out)).eval()
    assert _loss(trained, processor, data, vlm) < before - 0.05


@pytest.mark.parametrize("preset", PRESETS)
def test_cli_fuses_two_trained_adapters(preset, tmp_path):
    vlm = preset == "tiny-llava"
    data = _data(tmp_path, vlm)
    common = ["--model", preset, "--data", str(data), "--steps", "6", "--batch-size", "3", "--set", "max_new_tokens=1"]
    for task in ("a", "b"):
        assert main(["train", *common, "--method", "pfeiffer", "--lr", "1e-2", "--output", str(tmp_path / task)]) == 0
    out = tmp_path / "fused"
    options = f"method_options={{adapters: [{tmp_path / 'a'}, {tmp_path / 'b'}]}}"
    assert main(["train", *common, "--method", "fusion", "--lr", "1e-2", "--set", options, "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["task0", "task1"]
    model, processor = build_tiny(preset)
    assert adapters.load_native(model.eval(), out) == "fusion"
    fused_loss = _loss(model, processor, data, vlm)
    assert fused_loss < _loss(build_tiny(preset)[0].eval(), processor, data, vlm)  # below the base
    assert main(["train", *common, "--method", "fusion", "--output", str(tmp_path / "bad")]) == 2
