"""Mix-of-Show gradient fusion of two subjects (LoRA + their own trigger token) on the tiny SD1.5 pipeline:
after fusion each trigger reproduces its own subject's output (latents after 3 guided steps) better than
linear merging of the same two does, and is closer to its own subject than to the other; on average over
the subjects it also beats the exact sum of both deltas (cat)."""

from __future__ import annotations

import copy

import pytest
import torch
from merge_helpers import PROMPT, outputs, random_adapter

from personalize.cli import main
from personalize.formats import save_adapter
from personalize.merge import merge_adapters

CROSS_KV = ["attn2.to_k", "attn2.to_v"]


@pytest.fixture(scope="module")
def subjects(tiny_pipelines, tmp_path_factory):
    pipe = tiny_pipelines("tiny-sd15")
    root = tmp_path_factory.mktemp("subjects")
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    folders = {}
    for seed, token in ((11, "<dog>"), (12, "<cup>")):
        # A subject that binds to its trigger through the text path, as Mix-of-Show's concepts do: LoRAs on
        # the text encoder and on the UNet's cross-attention keys/values (whose inputs are the text features).
        components = random_adapter(pipe, "lora", seed, ("unet",), std=0.15, unet_targets=CROSS_KV, rank=4, alpha=4)
        vector = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))
        save_adapter(
            root / token.strip("<>"),
            components,
            method="lora",
            family="sd1",
            hyper={"rank": 4},
            embeddings={token: {"text_encoder": vector}},
        )
        folders[token] = root / token.strip("<>")
    return folders


def distance(a, b):
    return float((a - b).norm())


def test_fusion_keeps_each_trigger_closer_to_its_own_subject(subjects, tiny_pipelines, tmp_path):
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    tokens = list(subjects)
    own = {token: outputs(pipe, folder, [token])[token] for token, folder in subjects.items()}
    results = {}
    for method in ("fusion", "cat", "linear"):
        merge_adapters(
            list(subjects.values()),
            method=method,
            rank=64 if method == "fusion" else None,
            base=pipe,
            output=tmp_path / method,
            fusion_steps=4,
        )
        results[method] = outputs(pipe, tmp_path / method, tokens)
    gap = {m: {t: distance(results[m][t], own[t]) for t in tokens} for m in results}
    print({m: {t: round(v, 3) for t, v in d.items()} for m, d in gap.items()})
    for token, other in (tokens, tokens[::-1]):
        assert gap["fusion"][token] < gap["linear"][token], token  # peft-style linear merging
        assert gap["fusion"][token] < distance(results["fusion"][token], own[other]), token  # its own subject
    # the exact sum of both deltas (cat), on average over the subjects
    assert sum(gap["fusion"].values()) < sum(gap["cat"].values())


@pytest.mark.slow  # two more fusions; the API test above runs by default
def test_fusion_through_the_cli_with_prompt_files_and_into_the_base(subjects, tmp_path, capsys):
    files = []
    for token in subjects:
        path = tmp_path / f"{token.strip('<>')}.txt"
        path.write_text(f"{PROMPT.format(token)}\n{token} on a table\n")
        files += ["--prompts", str(path)]
    inputs = [str(folder) for folder in subjects.values()]
    args = ["merge", *inputs, "--method", "fusion", "--base", "tiny-sd15", "--fusion-steps", "2", *files]
    assert main([*args, "--rank", "8", "-o", str(tmp_path / "lora")]) == 0
    assert "(fusion)" in capsys.readouterr().out
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "lora" / "learned_embeds.safetensors").is_file()  # both triggers travel along
    assert main([*args, "--into-base", "-o", str(tmp_path / "model")]) == 0
    assert list((tmp_path / "model" / "unet").glob("*.safetensors"))
    assert main([*args[:-4], "--prompts", files[1], "-o", str(tmp_path / "x")]) == 2  # one file for two inputs
    assert "--prompts" in capsys.readouterr().err
