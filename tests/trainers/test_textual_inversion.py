"""Textual Inversion and pivotal tuning on tiny-sd15 / tiny-sdxl: only the new rows change, the token round-trips
through the saved files into fresh pipelines (ours and stock diffusers), multi-vector prompts expand, pivotal
saves and reloads both parts, a known word is refused."""

import copy
import re

import pytest
import torch
from safetensors.torch import load_file

from personalize.errors import UserError
from personalize.models.encode import encode_text
from personalize.trainers.diffusion.new_tokens import (
    OBJECT_TEMPLATES,
    add_new_tokens,
    expand_prompt,
    initial_rows,
    template_prompt,
)

TOKEN = "<cat-toy>"


def _ti(quick, model="tiny-sd15", **options):
    settings = dict(method="textual-inversion", token=TOKEN, init_word="cat", vectors=2, lr=5e-2, weight_decay=0.1)
    settings.update(options)
    return quick(model=model, **settings)


def _prompt_embeds(pipe, prompt):
    """The stock pipeline's own prompt encoding (it expands multi-vector tokens itself)."""
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            return torch.cat([embeds.flatten(), pooled.flatten()])
        embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        return embeds


def test_multi_vector_prompts_expand_like_diffusers(tiny_pipelines):
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    add_new_tokens(pipe, TOKEN, 3, "cat")
    for prompt in [f"a photo of {TOKEN}", f"{TOKEN}, {TOKEN} on a beach", "no token here"]:
        assert expand_prompt(prompt, TOKEN, 3) == pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    assert expand_prompt(f"a {TOKEN}", TOKEN, 3) == f"a {TOKEN} {TOKEN}_1 {TOKEN}_2"
    ids = pipe.tokenizer(expand_prompt(f"a {TOKEN}", TOKEN, 3)).input_ids
    assert ids[2:5] == [1000, 1001, 1002]  # after <start> and 'a': one id per vector


def test_init_word_rows_and_templates(tiny_pipelines):
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    weight = pipe.text_encoder.get_input_embeddings().weight
    cat, dog = (pipe.tokenizer(word, add_special_tokens=False).input_ids[0] for word in ("cat", "dog"))
    rows = initial_rows(weight, 3, [cat, dog])
    assert torch.equal(rows, weight[[cat, dog, cat]].detach())
    random_rows = initial_rows(weight, 2, [], torch.Generator().manual_seed(0))
    assert random_rows.shape == (2, weight.shape[1]) and torch.isfinite(random_rows).all()
    assert template_prompt("object", TOKEN) == OBJECT_TEMPLATES[0].format(TOKEN)
    drawn = {template_prompt("style", TOKEN, torch.Generator().manual_seed(seed)) for seed in range(20)}
    assert len(drawn) > 3 and all(TOKEN in prompt and "style" in prompt for prompt in drawn)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_an_optimizer_step_changes_only_the_new_rows(tiny_pipelines, model):
    pipe = copy.deepcopy(tiny_pipelines(model))
    encoders = [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]
    before = {name: getattr(pipe, name).get_input_embeddings().weight.clone() for name in encoders}
    tokens = add_new_tokens(pipe, TOKEN, 2, "cat")
    optimizer = torch.optim.AdamW(tokens.rows.parameters(), lr=0.1, weight_decay=0.5)
    loss = encode_text(pipe, [expand_prompt(f"a photo of {TOKEN}", TOKEN, 2)])["prompt_embeds"].square().mean()
    loss.backward()
    optimizer.step()
    tokens.install(pipe)
    for name, old in before.items():
        weight = getattr(pipe, name).get_input_embeddings().weight
        assert weight.shape == (len(old) + 2, old.shape[1])
        assert torch.equal(weight[: len(old)], old)  # bit-identical
        assert not torch.equal(weight[len(old) :], old[[_cat(pipe, name)] * 2])  # the new rows moved
    assert len(pipe.tokenizer) == 1002


def _cat(pipe, component):
    tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
    return tokenizer("cat", add_special_tokens=False).input_ids[0]


def test_a_word_the_vocabulary_knows_is_refused(quick, tiny_pipelines):
    with pytest.raises(UserError, match="'cat' is already in the vocabulary"):
        _ti(quick, token="cat")
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    add_new_tokens(pipe, TOKEN, 1)
    with pytest.raises(UserError, match="already in the vocabulary"):
        add_new_tokens(pipe, TOKEN, 1)


def test_sd15_token_round_trips_into_ours_and_stock_diffusers(quick, tiny_pipelines):
    from personalize.pipelines import load_adapter

    base = tiny_pipelines("tiny-sd15")
    caller = copy.deepcopy(base)
    result = _ti(quick, steps=3)
    out = result.output_dir
    saved = load_file(str(out / "learned_embeds.safetensors"))
    assert list(saved) == [TOKEN] and saved[TOKEN].shape == (2, 32)
    cat = base.text_encoder.get_input_embeddings().weight[_cat(base, "text_encoder")]
    assert not torch.allclose(saved[TOKEN][0], cat)  # it trained away from the init word
    assert (out / "a1111" / "cat-toy.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert TOKEN in card and "load_textual_inversion" in card
    # the caller's pipeline is unchanged (quick trains a copy; same contract for any pipe passed in)
    assert len(caller.tokenizer) == len(base.tokenizer)

    stock = copy.deepcopy(base)
    stock.load_textual_inversion(str(out))
    ours = copy.deepcopy(base)
    load_adapter(ours, out)
    prompt = f"a photo of {TOKEN} on the beach"
    assert torch.equal(_prompt_embeds(stock, prompt), _prompt_embeds(ours, prompt))
    assert not torch.equal(_prompt_embeds(stock, prompt), _prompt_embeds(base, prompt))
    weight = stock.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[:1000], base.text_encoder.get_input_embeddings().weight)
    assert torch.equal(weight[1000:], saved[TOKEN])


def test_sdxl_token_trains_in_both_encoders_and_loads_in_stock_diffusers(quick, tiny_pipelines):
    from personalize.pipelines import load_adapter

    base = tiny_pipelines("tiny-sdxl")
    out = _ti(quick, model="tiny-sdxl", vectors=1).output_dir
    first = load_file(str(out / "learned_embeds.safetensors"))[TOKEN]
    second = load_file(str(out / "learned_embeds_2.safetensors"))[TOKEN]
    export = load_file(str(out / "a1111" / "cat-toy.safetensors"))
    assert torch.equal(export["clip_l"], first) and torch.equal(export["clip_g"], second)
    assert first.shape == (1, base.text_encoder.config.hidden_size)
    assert second.shape == (1, base.text_encoder_2.config.hidden_size)

    stock = copy.deepcopy(base)
    stock.load_textual_inversion(str(out))
    stock.load_textual_inversion(
        str(out),
        weight_name="learned_embeds_2.safetensors",
        text_encoder=stock.text_encoder_2,
        tokenizer=stock.tokenizer_2,
    )
    ours = copy.deepcopy(base)
    load_adapter(ours, out)
    prompt = f"a {TOKEN} sitting on the grass"
    assert torch.equal(_prompt_embeds(stock, prompt), _prompt_embeds(ours, prompt))
    assert not torch.equal(_prompt_embeds(stock, prompt), _prompt_embeds(base, prompt))


def test_pivotal_saves_and_reloads_the_token_and_the_lora(quick, tiny_pipelines):
    from personalize.pipelines import describe_adapters, load_adapter

    base = tiny_pipelines("tiny-sd15")
    result = quick(method="pivotal", token=TOKEN, init_word="cat", vectors=2, rank=4, lr=1e-2, embedding_lr=5e-2)
    out = result.output_dir
    assert (out / "learned_embeds.safetensors").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    ours = copy.deepcopy(base)
    load_adapter(ours, out, name="toy")
    [described] = describe_adapters(ours)
    assert "unet" in described["components"] and TOKEN in str(described)

    stock = copy.deepcopy(base)
    stock.load_lora_weights(str(out))
    stock.load_textual_inversion(str(out))
    prompt = f"a photo of {TOKEN} cat"
    embeds = _prompt_embeds(stock, prompt)
    assert torch.equal(embeds, _prompt_embeds(ours, prompt))
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = stock.unet(latents, 500, encoder_hidden_states=embeds).sample
        got = ours.unet(latents, 500, encoder_hidden_states=embeds).sample
        plain = base.unet(latents, 500, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, plain)

    snippet = (out / "README.md").read_text().split("```python")[1].split("```")[0]
    call = "pipe(" + f'"a {TOKEN}"' + ", num_inference_steps=1, height=64, width=64).images"
    snippet = re.sub(r"pipe\((.*)\)\.images", lambda _: call, snippet)
    namespace: dict = {}
    exec(snippet, namespace)  # the model card's own code loads the token and the LoRA
    assert torch.equal(_prompt_embeds(namespace["pipe"], prompt), embeds)


def test_pivotal_freezes_the_token_after_its_fraction_of_the_steps(quick, tiny_pipelines, tmp_path):
    base = tiny_pipelines("tiny-sd15")
    cat = base.text_encoder.get_input_embeddings().weight[_cat(base, "text_encoder")]
    settings = dict(method="pivotal", token=TOKEN, init_word="cat", rank=4, embedding_lr=5e-2)
    never = quick(stop_embedding_after=0.2, output=str(tmp_path / "never"), **settings)  # round(2 * 0.2) = 0 steps
    assert torch.equal(load_file(str(never.output_dir / "learned_embeds.safetensors"))[TOKEN][0], cat)
    half = quick(output=str(tmp_path / "half"), **settings)  # the default 0.5: one of the two steps
    assert not torch.equal(load_file(str(half.output_dir / "learned_embeds.safetensors"))[TOKEN][0], cat)


def test_token_options_are_checked_and_resolved(tmp_path):
    from personalize.trainers.diffusion.config import config_from_options, resolve

    from .conftest import CAT

    config, _ = resolve(config_from_options({"images": str(CAT), "method": "textual-inversion"}))
    assert config.data.token == "<cat>" and config.embedding_lr == config.lr and config.stop_embedding_after == 1.0
    config, _ = resolve(config_from_options({"images": str(CAT), "method": "pivotal"}))
    assert config.embedding_lr == 5e-4 and config.stop_embedding_after == 0.5 and config.rank == 16
    for bad, match in [
        ({"vectors": 0}, "--vectors"),
        ({"stop_embedding_after": 1.5}, "stop-embedding-after"),
        ({"method": "pivotal", "pivotal_method": "lorra"}, "did you mean 'lora'"),
        ({"train_text_encoder": True}, "method pivotal"),
    ]:
        options = {"images": str(CAT), "method": "textual-inversion", **bad}
        with pytest.raises(UserError, match=match):
            resolve(config_from_options(options))


def test_cli_flags_reach_the_config():
    from personalize.cli import build_parser
    from personalize.config import build
    from personalize.trainers.cli import flags_to_config
    from personalize.trainers.diffusion.config import TrainConfig

    from .conftest import CAT

    argv = ["train", "--images", str(CAT), "--method", "pivotal", "--token", TOKEN, "--init-word", "toy"]
    argv += ["--vectors", "3", "--embedding-lr", "1e-3", "--stop-embedding-after", "0.25", "--pivotal-method", "loha"]
    args = build_parser().parse_args(argv)
    config = build(TrainConfig, flags=flags_to_config(args))
    assert (config.method, config.data.token, config.init_word, config.vectors) == ("pivotal", TOKEN, "toy", 3)
    assert (config.embedding_lr, config.stop_embedding_after, config.pivotal_method) == (1e-3, 0.25, "loha")


def test_interrupted_textual_inversion_resumes_to_the_same_token(quick, monkeypatch, tmp_path):
    from personalize.trainers.common import loop

    settings = dict(steps=4, checkpoint_every=2, init_word="", vectors=2)  # random init and templates: seeded
    uninterrupted = _ti(quick, output=str(tmp_path / "a"), **settings).output_dir
    save = loop.save_checkpoint

    def save_then_die(accelerator, state, root, keep):
        save(accelerator, state, root, keep)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _ti(quick, output=str(tmp_path / "b"), **settings)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    torch.manual_seed(999)
    resumed = _ti(quick, output=str(tmp_path / "b"), resume=True, **settings)
    assert resumed.metrics["steps"] == 4
    expected = load_file(str(uninterrupted / "learned_embeds.safetensors"))[TOKEN]
    got = load_file(str(resumed.output_dir / "learned_embeds.safetensors"))[TOKEN]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


DDP_SCRIPT = """
import sys
import torch
from safetensors.torch import save_file
from personalize.models import build_tiny
from personalize.trainers import train
from personalize.trainers.diffusion import new_tokens
torch.set_num_threads(1)
out, method, rank = sys.argv[1], sys.argv[2], int(__import__("os").environ["RANK"])
restore = new_tokens.NewTokens.restore
def dump_then_restore(self, pipe):
    rows = {name: value.detach().contiguous() for name, value in self.rows.rows.items()}
    save_file(rows, f"{out}-rows-{rank}.safetensors")
    restore(self, pipe)
new_tokens.NewTokens.restore = dump_then_restore
train(pipe=build_tiny("tiny-sd15"), images=sys.argv[3], model="tiny-sd15", method=method, token="<cat-toy>",
      init_word="cat", vectors=2, steps=3, resolution=64, output=out, validation_steps=1, validation_images=1,
      checkpoint_every=0, lr=5e-2, rank=4, embedding_lr=5e-2, cache_dir=sys.argv[4])
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["textual-inversion", "pivotal"])
def test_two_processes_keep_the_token_in_sync(tmp_path, cache_dir, method):
    """torchrun, two gloo ranks on CPU: the rows' gradients are all-reduced (also after pivotal's token freeze)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import CAT

    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    command = [str(torchrun), "--nproc_per_node", "2", str(script), str(out), method, str(CAT), str(cache_dir)]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=900)
    first, second = (load_file(str(tmp_path / f"out-rows-{rank}.safetensors")) for rank in (0, 1))
    assert torch.equal(first["text_encoder"], second["text_encoder"])
    assert torch.equal(load_file(str(out / "learned_embeds.safetensors"))[TOKEN], first["text_encoder"])


def test_bf16_base_trains_fp32_token_rows(quick):
    """The frozen UNet and text encoder run in bf16 (autocast: the UNet is not wrapped by accelerate here)."""
    result = _ti(quick, mixed_precision="bf16")
    rows = load_file(str(result.output_dir / "learned_embeds.safetensors"))[TOKEN]
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    assert result.metrics["final_loss"] == result.metrics["final_loss"]  # not NaN


def test_cli_trains_a_token_end_to_end(capsys, tmp_path, cache_dir):
    from personalize.cli import main
    from personalize.config import build
    from personalize.trainers.diffusion.config import TrainConfig

    from .conftest import CAT

    out = tmp_path / "toy"
    argv = ["train", "--images", str(CAT), "--preset", "tiny", "--method", "textual-inversion", "--steps", "2"]
    argv += ["--init-word", "toy", "--vectors", "2", "--learnable-property", "style", "--output", str(out)]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_images=0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "<cat> <cat>_1 (init 'toy')" in printed and "prompt with <cat>" in printed  # token from the folder name
    assert load_file(str(out / "learned_embeds.safetensors"))["<cat>"].shape == (2, 32)
    rerun = build(TrainConfig, file=out / "config.yaml")
    assert (rerun.method, rerun.data.token, rerun.vectors, rerun.learnable_property) == (
        "textual-inversion",
        "<cat>",
        2,
        "style",
    )
