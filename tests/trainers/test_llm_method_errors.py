"""Bad input for the survey methods: one `error:` line naming what is missing, exit 2."""

import json

import pytest

from personalize.cli import main

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 (Conv1D projections, no q_proj/o_proj/down_proj): what Llama-style methods cannot adapt."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from personalize.models.tiny_tokenizers import tiny_llama_tokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = tiny_llama_tokenizer()
    tokenizer.save_pretrained(folder)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "what is one", "completion": "one is a number"}) + "\n")
    return path


@pytest.mark.parametrize(
    ("method", "named"),
    [
        ("llama-adapter", "q_proj/k_proj/v_proj/o_proj"),
        ("pasta", "decoder layers"),
        ("mam", "decoder layers"),
        ("ladder", "Llama-style decoder"),
        ("houlsby", "match no Linear"),
        ("adalora", "match no Linear"),
        ("vera", "match no Linear"),
        ("boft", "match no Linear"),
        ("unipelt", "decoder layers"),
    ],
)
def test_a_method_that_cannot_apply_to_the_model_is_one_error_line(method, named, gpt2_folder, data, tmp_path, capsys):
    command = ["train", "--model", str(gpt2_folder), "--data", str(data), "--method", method, "--steps", "1"]
    assert main([*command, "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # (transformers' loading bar may come first)
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].split("error:")[1] and named in errors[0] and "Traceback" not in lines


def test_a_peft_file_of_a_method_we_do_not_read_is_one_error_line(tmp_path, capsys):
    from personalize.models import build_tiny

    model = peft.get_peft_model(build_tiny("tiny-llama")[0], peft.LNTuningConfig(target_modules=["norm"]))
    model.save_pretrained(str(tmp_path / "ln"))
    code = main(["generate", "--model", "tiny-llama", "--adapter", str(tmp_path / "ln"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "LN_TUNING" in err and "PeftModel.from_pretrained" in err


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning", "p-tuning", "mam", "unipelt"])
def test_a_prompt_method_on_a_model_without_token_input_embeddings_is_a_user_error(method):
    """A ViT's input embeddings are patch projections: no vocabulary to prepend virtual tokens to."""
    from transformers import ViTConfig, ViTModel

    from personalize import adapters
    from personalize.errors import UserError

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16)
    with pytest.raises(UserError, match=r"not ViTModel \(it has no token input embeddings\)"):
        adapters.inject(ViTModel(config), method, num_virtual_tokens=2)


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
def test_a_prompt_method_on_a_vlm_through_the_cli_is_one_error_line(method, data, tmp_path, capsys):
    command = ["train", "--model", "tiny-llava", "--data", str(data), "--method", method, "--steps", "1"]
    assert main([*command, "--output", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "not prompt methods" in errors[0]
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_a_peft_layout_that_cannot_hold_the_adapter_fails_before_training(data, tmp_path, capsys):
    """BOFT with two butterfly stages has no peft file: refused before the first step, not after the run."""
    command = ["train", "--model", "tiny-llama", "--data", str(data), "--method", "boft", "--steps", "1"]
    command += ["--set", "method_options={stages: 2, block_size: 4}", "--output", str(tmp_path / "out")]
    assert main(command) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "one butterfly stage" in errors[0] and "training" not in captured.err
