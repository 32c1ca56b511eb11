"""`personalize convert` and `personalize inspect` on files we write (in-process: no subprocess start-up)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main
from personalize.formats import read_adapter, save_adapter

from .helpers import HYPER, assert_same_components, with_adapter


@pytest.fixture(scope="module")
def sd15_lokr(tiny_pipelines, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lokr")
    pipe = tiny_pipelines("tiny-sd15")
    _, components = with_adapter(pipe, "lokr", text=False)
    save_adapter(folder, components, method="lokr", family="sd1", hyper=HYPER["lokr"], output_name="subject")
    return folder / "subject.safetensors", components


def test_inspect_prints_a_table(sd15_lokr, capsys):
    file, components = sd15_lokr
    assert main(["inspect", str(file)]) == 0
    out = capsys.readouterr().out
    assert "layout       kohya" in out and "family guess sd1" in out
    assert "unet       lokr" in out and "attn1.to_q x" in out
    assert "ss_network_module = lycoris.kohya" in out
    assert f"{sum(v.numel() for k, v in components['unet'].items() if not k.endswith('.alpha')):,}" in out


def test_convert_kohya_to_peft_folders_and_back_without_a_model(sd15_lokr, tmp_path, tiny_pipelines):
    file, components = sd15_lokr
    assert main(["convert", str(file), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back.safetensors"), "--to", "kohya"]) == 0
    read = read_adapter(tmp_path / "back.safetensors", tiny_pipelines("tiny-sd15").unet)
    assert_same_components(components, read.components)


def test_convert_lokr_to_diffusers_is_a_clear_error(sd15_lokr, tmp_path, capsys):
    file, _ = sd15_lokr
    assert main(["convert", str(file), str(tmp_path / "out"), "--to", "diffusers"]) == 2
    assert "lora-svd" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_lora_svd_reports_errors_and_loads_in_diffusers(sd15_lokr, tmp_path, capsys):
    file, _ = sd15_lokr
    code = main(
        ["convert", str(file), str(tmp_path / "svd"), "--to", "lora-svd", "--rank", "64", "--model", "tiny-sd15"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "unet overall relative error: " in out
    overall = float(out.split("unet overall relative error: ")[1].split()[0])
    assert overall < 1e-5  # rank 64 covers every delta of the tiny UNet
    tensors = load_file(tmp_path / "svd" / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("unet.") for k in tensors)


def test_pickle_and_unknown_inputs_exit_2(tmp_path, capsys):
    torch.save({"x": torch.zeros(1)}, tmp_path / "a.ckpt")
    assert main(["inspect", str(tmp_path / "a.ckpt")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2


def test_convert_pipeline_adapter_to_peft_subfolders_and_back(tiny_pipelines, tmp_path):
    pipe = tiny_pipelines("tiny-sd15")
    _, components = with_adapter(pipe, "lora")
    save_adapter(tmp_path / "src", components, method="lora", family="sd1", hyper={})
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "peft"), "--to", "peft", "--model", "tiny-sd15"]) == 0
    assert (tmp_path / "peft" / "unet" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "text_encoder" / "adapter_model.safetensors").is_file()
    read = read_adapter(tmp_path / "peft", pipe)
    assert read.layout == "peft"
    assert_same_components(components, read.components)


def test_inspect_on_a_run_folder_reports_the_adapter_size_not_the_checkpoints(sd15_lokr, capsys):
    import re

    file, _ = sd15_lokr
    folder = file.parent
    checkpoint = folder / "checkpoints" / "step-000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.safetensors").write_bytes(b"\0" * 3_000_000)  # optimizer state dwarfs the adapter
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    size = float(re.search(r"file size\s+([\d.]+) MB", out).group(1))
    assert size == pytest.approx(file.stat().st_size / 1e6, abs=0.01)
    assert "the whole folder: " in out
