"""ED-LoRA (Mix-of-Show's layer-wise token + LoRAs) on tiny-sd15: the token gets one set of vectors per
cross-attention layer, each layer reads its own encoding of the prompt, the run loads into a stock pipeline
through load_adapter (and `personalize generate --adapter`), and unloading gives the base back exactly."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from personalize.errors import UserError
from personalize.pipelines import layerwise, load_adapter, unload_adapter

TOKEN = "<toy>"
LAYERS = 6  # tiny-sd15's cross-attention layers: 2 down, 1 mid, 3 up


def test_layer_tokens_rewrite_and_the_layer_order(tiny_pipelines):
    assert layerwise.layer_token(TOKEN, 0) == TOKEN and layerwise.layer_token(TOKEN, 3) == "<toy>@3"
    assert layerwise.rewrite("a <toy> and <toy>_1, <toy>@2", [TOKEN], 4) == "a <toy>@4 and <toy>_1, <toy>@2"
    assert layerwise.rewrite(["<toy>", "plain"], [TOKEN], 1) == ["<toy>@1", "plain"]
    assert layerwise.layered_triggers(["<toy>", "<toy>@1", "<toy>@2", "<cat>"]) == {TOKEN: 3}
    with pytest.raises(UserError, match="lacks the vectors of layer"):
        layerwise.layered_triggers(["<toy>", "<toy>@2"])
    paths = layerwise.cross_attention_paths(tiny_pipelines("tiny-sd15").unet)
    assert (
        len(paths) == LAYERS
        and [p.split(".")[0] for p in paths] == ["down_blocks"] * 2 + ["mid_block"] + ["up_blocks"] * 3
    )  # Mix-of-Show counts down, mid, up (the UNet registers up_blocks before mid_block)
    parts = [(torch.full((1, 2, 3), float(i)), torch.ones(1, 3)) for i in range(3)]
    joined = layerwise.join_layers(parts)
    assert joined[0].shape == (1, 6, 3) and torch.equal(joined[1], parts[0][1])  # pooled: layer 0's


def _cross_attention_inputs(pipe, prompt):
    """Each cross-attention layer's key input (B, T, C) during one guided denoising step."""
    seen = {}
    paths = layerwise.cross_attention_paths(pipe.unet)

    def keep(path):
        def hook(module, args, output):
            seen.setdefault(path, args[0].detach().clone())

        return hook

    hooks = [pipe.unet.get_submodule(f"{path}.to_k").register_forward_hook(keep(path)) for path in paths]
    try:
        with torch.no_grad():
            pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="latent")
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[path] for path in paths]


def test_ed_lora_trains_a_token_per_layer_and_loads_into_a_stock_pipeline(quick, tiny_pipelines):
    result = quick(method="ed-lora", token=TOKEN, init_word="cat", steps=2, validation_images=0, lr=1e-2)
    out = result.output_dir
    embeds = load_file(str(out / "learned_embeds.safetensors"))
    assert sorted(embeds) == sorted(layerwise.layer_token(TOKEN, layer) for layer in range(LAYERS))
    layers = torch.stack([embeds[layerwise.layer_token(TOKEN, layer)] for layer in range(LAYERS)])  # (L, 1, d)
    assert not torch.allclose(layers[0], layers[-1])  # each layer's vectors got their own gradients
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    assert not (out / "a1111").exists()  # A1111 encodes a prompt once: no export of a layer-wise token

    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    base = _cross_attention_inputs(pipe, "a photo of a cat")
    load_adapter(pipe, str(out), name="toy")
    with_token = _cross_attention_inputs(pipe, f"a photo of {TOKEN}")
    assert all(x.shape == (2, 77, 32) for x in with_token)  # each layer its own 77-token slice (CFG: 2 rows)
    assert not torch.allclose(with_token[0][1], with_token[-1][1])  # the layers see different encodings
    plain = _cross_attention_inputs(pipe, "a photo of a cat")
    assert all(torch.equal(plain[0], x) for x in plain)  # no trigger: one encoding for every layer
    unload_adapter(pipe, "toy")
    assert layerwise.state_of(pipe) is None and "encode_prompt" not in pipe.__dict__
    assert all(torch.equal(a, b) for a, b in zip(base, _cross_attention_inputs(pipe, "a photo of a cat")))


def test_the_token_stops_at_its_norm_limit(quick, tiny_pipelines):
    """Mix-of-Show's stop: a limit below the starting norm keeps every layer's vectors at the init word's."""
    result = quick(
        method="ed-lora", token=TOKEN, init_word="cat", steps=2, validation_images=0, lr=1e-2, embedding_norm_limit=1e-6
    )
    embeds = load_file(str(result.output_dir / "learned_embeds.safetensors"))
    pipe = tiny_pipelines("tiny-sd15")
    cat = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("cat", add_special_tokens=False).input_ids]
    assert all(torch.equal(vectors, cat) for vectors in embeds.values())
    assert "embedding_norm_limit: 1.0e-06" in (result.output_dir / "config.yaml").read_text()


def test_a_layer_wise_token_for_another_unet_is_refused(tiny_pipelines):
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    embeddings = {layerwise.layer_token(TOKEN, layer): {"text_encoder": torch.zeros(1, 32)} for layer in range(16)}
    with pytest.raises(UserError, match="16 cross-attention layers, but this UNet has 6"):
        load_adapter(pipe, _embeddings_only(embeddings))
    assert (
        layerwise.state_of(pipe) is None and pipe.tokenizer.convert_tokens_to_ids(TOKEN) == pipe.tokenizer.unk_token_id
    )


def _embeddings_only(embeddings):
    from personalize.pipelines.source import AdapterSource

    return AdapterSource({}, embeddings)


@pytest.mark.slow  # a CLI run and a CLI generation (about 15 s on a busy 2-core machine)
def test_cli_trains_ed_lora_and_generates_with_it(capsys, tmp_path, cache_dir, tiny_pipelines, monkeypatch):
    import personalize.models
    from personalize.cli import main
    from personalize.images import read_png_settings

    from .conftest import CAT

    out = tmp_path / "toy"
    argv = ["train", "--images", str(CAT), "--preset", "tiny", "--method", "ed-lora", "--steps", "2"]
    argv += ["--token", TOKEN, "--init-word", "toy", "--output", str(out), "--set", f"data.cache_dir={cache_dir}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{TOKEN} x {LAYERS} cross-attention layers" in printed
    assert main(["train", "--images", str(CAT), "--method", "ed-lora", "--pivotal-method", "loha"]) == 2
    assert "--pivotal-method does not apply" in capsys.readouterr().err
    monkeypatch.setattr(personalize.models, "load_pipeline", lambda name, **_: copy.deepcopy(tiny_pipelines(name)))
    image = tmp_path / "toy.png"
    argv = ["generate", "--model", "tiny-sd15", "--prompt", f"a photo of {TOKEN}", "--steps", "2", "--width", "32"]
    assert main([*argv, "--height", "32", "--adapter", f"{out}:0.8", "--output", str(image)]) == 0
    assert read_png_settings(image)["adapters"][0]["scale"] == 0.8
