"""`personalize merge` end to end on the tiny SD1.5 pipeline: every method through the CLI and the API,
outputs read by stock diffusers / our loader / peft, exactness where the method is exact, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main
from personalize.merge import merge_adapters
from personalize.pipelines import load_adapter, unload_adapter

METHODS = ("linear", "cat", "svd", "ties", "dare", "dare-ties")


@torch.no_grad()
def unet_and_text(pipe):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    ids = torch.arange(2, 9)[None]
    hidden = pipe.text_encoder(ids).last_hidden_state
    return torch.cat([pipe.unet(sample, 10, encoder_hidden_states=hidden).sample.flatten(), hidden.flatten()])


def stacked(pipe, specs):
    """Outputs with every (path, scale) loaded side by side: sum_i scale_i dW_i, what cat must equal."""
    names = [load_adapter(pipe, str(path), scale=scale, name=f"s{i}") for i, (path, scale) in enumerate(specs)]
    try:
        return unet_and_text(pipe)
    finally:
        for name in names:
            unload_adapter(pipe, name)


def close(a, b, tol=1e-4):
    return float((a - b).norm()) <= tol * float(b.norm())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_through_the_cli_loads_in_stock_diffusers(method, sd15_inputs, tiny_pipelines, tmp_path, capsys):
    paths, _ = sd15_inputs
    out = tmp_path / "merged"
    args = ["merge", f"{paths['a']}:0.7", f"{paths['b']}:0.5", "--method", method, "-o", str(out)]
    args += ["--density", "0.6"] if method in ("ties", "dare", "dare-ties") else []
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "overall relative error" in printed and f"({method})" in printed
    report = json.loads((out / "merge_report.json").read_text())
    errors = report["relative_error"]
    assert len(errors) > 10 and all(value >= 0 for value in errors.values())
    assert (errors["overall"] < 1e-5) == (method == "cat")  # cat is exact, the others are not
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    before = unet_and_text(pipe)
    pipe.load_lora_weights(str(out))  # stock diffusers reads the layout
    assert not close(unet_and_text(pipe), before, 1e-3)
    assert (out / "merged.safetensors").is_file()  # kohya layout for A1111 / ComfyUI
    tensors = load_file(out / "pytorch_lora_weights.safetensors")
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == ({8} if method == "cat" else {4})


def test_cat_equals_the_adapters_stacked_and_svd_at_full_rank_too(sd15_inputs, tiny_pipelines, tmp_path):
    paths, _ = sd15_inputs
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    specs = [(paths["a"], 0.7), (paths["r8"], -0.4)]  # different ranks, one negative weight
    expected = stacked(pipe, specs)
    for method, rank in (("cat", None), ("svd", 12)):
        result = merge_adapters(specs, method=method, rank=rank, output=tmp_path / method)
        assert result.errors["overall"] < 1e-5
        name = load_adapter(pipe, str(tmp_path / method), name=method)
        assert close(unet_and_text(pipe), expected), method
        unload_adapter(pipe, name)
    low = merge_adapters(specs, method="svd", rank=2, output=tmp_path / "low")
    assert 0.05 < low.errors["overall"] < 1  # truncation reported


def test_lycoris_inputs_are_expanded_on_the_base(sd15_inputs, tiny_pipelines, tmp_path, capsys):
    paths, _ = sd15_inputs
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    specs = [(paths["loha"], 1.0), (paths["lokr"], 0.5), (paths["a"], 0.3)]
    expected = stacked(pipe, specs)
    result = merge_adapters(specs, method="cat", base=pipe, output=tmp_path / "cat")
    assert result.errors["overall"] < 1e-5
    load_adapter(pipe, str(tmp_path / "cat"), name="m")
    assert close(unet_and_text(pipe), expected)
    unload_adapter(pipe, "m")
    # without the base the LoHa cannot be expanded: one line, exit 2, nothing written
    code = main(["merge", str(paths["loha"]), str(paths["a"]), "--method", "svd", "-o", str(tmp_path / "x")])
    assert code == 2 and "--base" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert (
        main(
            [
                "merge",
                str(paths["loha"]),
                str(paths["a"]),
                "--method",
                "svd",
                "--rank",
                "6",
                "--base",
                "tiny-sd15",
                "-o",
                str(tmp_path / "svd"),
            ]
        )
        == 0
    )


def test_into_base_writes_a_diffusers_folder_with_the_exact_sum(sd15_inputs, tiny_pipelines, tmp_path):
    from diffusers import StableDiffusionPipeline

    paths, _ = sd15_inputs
    pipe = copy.deepcopy(tiny_pipelines("tiny-sd15"))
    before = unet_and_text(pipe)
    specs = [(paths["a"], 0.7), (paths["lokr"], 0.5)]
    expected = stacked(pipe, specs)
    merge_adapters(specs, method="linear", base=pipe, into_base=True, output=tmp_path / "model")
    assert torch.equal(unet_and_text(pipe), before)  # the caller's pipeline is given back unchanged
    assert list((tmp_path / "model" / "unet").glob("*.safetensors"))
    assert not list((tmp_path / "model").rglob("*.bin"))
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    assert close(unet_and_text(merged), expected)


def test_dare_is_seeded(sd15_inputs, tmp_path):
    paths, _ = sd15_inputs
    specs = [(paths["a"], 1.0), (paths["b"], 1.0)]
    runs = [
        merge_adapters(specs, method="dare", density=0.5, seed=s, output=tmp_path / str(i))
        for i, s in enumerate((3, 3, 4))
    ]
    files = [load_file(tmp_path / str(i) / "pytorch_lora_weights.safetensors") for i in range(3)]
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])
    assert any(not torch.equal(files[0][k], files[2][k]) for k in files[0])
    assert runs[0].errors == runs[1].errors


def test_llm_loras_merge_into_a_peft_folder(tmp_path):
    peft = pytest.importorskip("peft")
    from personalize import adapters
    from personalize.formats import save_adapter
    from personalize.models import build_tiny

    model = build_tiny("tiny-llama")[0]
    made = []
    for seed in (1, 2):
        copy_ = copy.deepcopy(model)
        adapters.inject(copy_, "lora", targets="all-linear", name="x", rank=4, alpha=8)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in adapters.trainable_parameters(copy_):
                p.normal_(0, 0.05)
        save_adapter(
            tmp_path / f"in{seed}",
            {"model": adapters.state_dict(copy_, "x")},
            method="lora",
            family="llm",
            hyper={"rank": 4},
        )
        made.append(copy_)
    result = merge_adapters([tmp_path / "in1", tmp_path / "in2"], method="cat", output=tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").is_file() and result.errors["overall"] < 1e-5
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        expected = copy.deepcopy(model)
        adapters.load_state_dict  # noqa: B018 - the stacked reference below uses the injection core
        for i in (1, 2):
            adapters.inject_from_state_dict(expected, adapters.state_dict(made[i - 1], "x"), name=f"s{i}")
        reference = expected(ids).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "out"))
        assert close(loaded(ids).logits, reference, 1e-4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nope"], "invalid choice"),
        (["--density", "2", "--method", "ties"], "--density"),
        (["--density", "0.5", "--method", "svd"], "--density applies"),
        (["--into-base"], "--base"),
        (["--method", "fusion"], "--base"),
        (["--rank", "0"], "--rank"),
    ],
)
def test_bad_input_is_one_line(extra, message, sd15_inputs, tmp_path, capsys):
    paths, _ = sd15_inputs
    code = main(["merge", str(paths["a"]), str(paths["b"]), "-o", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unequal_ranks_in_factor_space_and_missing_files_are_errors(sd15_inputs, tmp_path, capsys):
    paths, _ = sd15_inputs
    assert main(["merge", str(paths["a"]), str(paths["r8"]), "--method", "linear", "-o", str(tmp_path / "o")]) == 2
    assert "equal ranks" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", f"{paths['a']}:x", "-o", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
