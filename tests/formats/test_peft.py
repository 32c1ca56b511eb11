"""peft layout: stock peft.PeftModel.from_pretrained loads what we write with our outputs; exact round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from personalize import adapters
from personalize.errors import UserError
from personalize.formats import read_adapter, save_adapter
from personalize.models import build_tiny
from personalize.models.tiny_layers import randomize

peft = pytest.importorskip("peft")

CASES = {
    "lora": ("all-linear", {"rank": 4, "alpha": 8}),
    "dora": ("attention", {"rank": 4, "alpha": 4}),
    "loha": ("attention", {"rank": 4, "alpha": 2}),
    "lokr": ("attention", {"rank": 2, "alpha": 1, "factor": 4}),
    "lokr-full": ("attention", {"rank": 8, "alpha": 1}),
    "krona": ("attention", {"a1": 4, "a2": 4}),
    "ia3": ("attention", {}),
}


@pytest.fixture(scope="module")
def llama():
    model, _ = build_tiny("tiny-llama")
    return model.eval()


def _ours(base, case: str):
    model = copy.deepcopy(base)
    targets, hyper = CASES[case]
    adapters.inject(model, case.split("-")[0], targets=targets, **hyper)
    for i, (_, module) in enumerate(model.named_modules()):
        if hasattr(module, "adapters") and "default" in module.adapters:
            randomize(module.adapters["default"], seed=i)
    return model


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_stock_peft_loads_ours_with_same_outputs(llama, tmp_path, case):
    ours = _ours(llama, case)
    method = case.split("-")[0]
    sd = adapters.state_dict(ours)
    files = save_adapter(tmp_path, {"model": sd}, method=method, family="llm", hyper=CASES[case][1], model=ours)
    assert {f.name for f in files} == {"adapter_config.json", "adapter_model.safetensors"}
    stock = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    expected = _logits(ours)
    assert not torch.allclose(expected, _logits(llama), atol=1e-4)
    assert torch.allclose(_logits(stock), expected, atol=1e-5)
    read = read_adapter(tmp_path, llama)
    assert read.layout == "peft"
    loaded = copy.deepcopy(llama)
    read.apply(loaded)
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)
    if case not in ("lokr-full", "krona"):  # two full factors: peft's alpha / r is folded into w1
        assert set(read.components["model"]) == set(sd)
        for key, value in sd.items():
            assert torch.allclose(read.components["model"][key].float(), value.float()), key


def test_peft_files_written_by_peft_load_here(llama, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True)
    model = peft.get_peft_model(copy.deepcopy(llama), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    expected = _logits(model)
    read = read_adapter(tmp_path, llama)
    loaded = copy.deepcopy(llama)
    read.apply(loaded)
    assert torch.allclose(_logits(loaded), expected, atol=1e-5)


def test_krona_with_unequal_factors_is_refused_for_peft(llama, tmp_path):
    model = copy.deepcopy(llama)
    adapters.inject(model, "krona", targets="attention", a1=4, a2=2)
    with pytest.raises(UserError, match="decompose_factor"):
        save_adapter(tmp_path, {"model": adapters.state_dict(model)}, method="krona", family="llm", hyper={})
    assert not list(tmp_path.iterdir())


def test_config_names_exact_modules(llama, tmp_path):
    ours = _ours(llama, "lora")
    save_adapter(tmp_path, {"model": adapters.state_dict(ours)}, method="lora", family="llm", hyper={})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
