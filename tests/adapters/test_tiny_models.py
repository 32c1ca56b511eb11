"""The same API on every family's tiny model: inject the preset, train a few steps, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

from personalize import adapters
from personalize.models import build_tiny


def _unet_call(unet, sdxl: bool):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.zeros(1, 6)}
    return lambda m: m(sample, 10, encoder_hidden_states=context, **kwargs).sample


def _dit_call(transformer, flux: bool):
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    context = torch.randn(1, 6, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    if flux:
        hidden = torch.randn(1, 16, cfg.in_channels, generator=g)
        ids = torch.zeros(16, 3)
        guidance = torch.tensor([3.5]) if cfg.guidance_embeds else None  # tiny-flux has FLUX.1-dev's guidance input
        return lambda m: (
            m(
                hidden,
                context,
                pooled,
                timestep=torch.tensor([0.5]),
                img_ids=ids,
                txt_ids=torch.zeros(6, 3),
                guidance=guidance,
            ).sample
        )
    hidden = torch.randn(1, cfg.in_channels, 8, 8, generator=g)
    return lambda m: m(hidden, context, pooled, timestep=torch.tensor([10])).sample


def _text_call(encoder):
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    return lambda m: m(ids).last_hidden_state


def _llm_call():
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    return lambda m: m(ids).logits


def _case(case: str):
    if case in ("sd15-unet", "sdxl-unet"):
        pipe = build_tiny(case.replace("-unet", "").replace("sd", "tiny-sd"))
        return copy.deepcopy(pipe.unet), "attention+ff", _unet_call(pipe.unet, case.startswith("sdxl"))
    if case == "sd15-conv":
        pipe = build_tiny("tiny-sd15")
        return copy.deepcopy(pipe.unet), "conv", _unet_call(pipe.unet, False)
    if case == "sd15-text":
        pipe = build_tiny("tiny-sd15")
        return copy.deepcopy(pipe.text_encoder), "text", _text_call(pipe.text_encoder)
    if case == "sdxl-text2":
        pipe = build_tiny("tiny-sdxl")
        return copy.deepcopy(pipe.text_encoder_2), "text", lambda m: m(torch.tensor([[1, 5, 9, 2]])).text_embeds
    if case in ("sd3", "flux"):
        pipe = build_tiny(f"tiny-{case}")
        return copy.deepcopy(pipe.transformer), "attention+ff", _dit_call(pipe.transformer, case == "flux")
    if case == "llama":
        model, _ = build_tiny("tiny-llama")
        return model, "all-linear", _llm_call()
    model, _ = build_tiny("tiny-llava")
    return model, "language", _llm_call()


CASES = ["sd15-unet", "sd15-conv", "sd15-text", "sdxl-unet", "sdxl-text2", "sd3", "flux", "llama", "llava"]
# LoRA on every family by default; LoKr on two (its other families run with -m slow).
MATRIX = [("lora", case) for case in CASES] + [
    pytest.param("lokr", case, marks=[] if case in ("sd15-unet", "llama") else [pytest.mark.slow]) for case in CASES
]


@pytest.mark.parametrize(("method", "case"), MATRIX)
def test_preset_trains_and_round_trips(case, method):
    model, preset, call = _case(case)
    model.float().train()
    hyper = {"rank": 4} if method == "lora" else {"rank": 4, "factor": 4}
    paths = adapters.inject(model, method, targets=preset, name="s", **hyper)
    assert paths
    with torch.no_grad():
        target = torch.randn_like(call(model))
    params = adapters.trainable_parameters(model)
    assert sum(p.numel() for p in params) < sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(call(model), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    saved = {k: v.clone() for k, v in adapters.state_dict(model, "s").items()}
    model.eval()
    with torch.no_grad():
        trained = call(model)
        adapters.remove(model, "s")
        adapters.inject_from_state_dict(model, saved, "s")
        torch.testing.assert_close(call(model), trained)


def test_presets_differ_by_model_kind_and_never_match_substrings():
    pipe = build_tiny("tiny-sd15")
    unet = copy.deepcopy(pipe.unet)
    paths = adapters.inject(unet, "lora", targets="attention", name="a")
    assert paths and all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for p in paths)
    text = copy.deepcopy(pipe.text_encoder)
    assert all("self_attn" in p or "mlp" in p for p in adapters.inject(text, "lora", targets="text", name="a"))
    llama, _ = build_tiny("tiny-llama")
    paths = adapters.inject(llama, "lora", targets="all-linear", name="a")
    assert "lm_head" not in paths and any(p.endswith("q_proj") for p in paths)
    fresh = copy.deepcopy(pipe.unet)
    assert adapters.inject(fresh, "lora", targets=["to_q"], name="q") == [p for p in paths_of(fresh, "to_q")]


def paths_of(model, suffix):
    return [p for p, m in model.named_modules() if p.endswith("." + suffix) and not p.endswith("base_layer")]


@pytest.mark.parametrize("method", ["bitfit", "norm"])
def test_selective_methods_train_only_their_parameters_and_restore(method):
    pipe = build_tiny("tiny-sd15")
    text = copy.deepcopy(pipe.text_encoder)
    ids = torch.tensor([[1, 5, 9, 2]])
    base_out = text(ids).last_hidden_state.detach()
    original = {n: p.detach().clone() for n, p in text.named_parameters()}
    names = adapters.inject(text, method, name="s")
    assert names and all(("norm" in n) if method == "norm" else n.endswith("bias") for n in names)
    params = adapters.trainable_parameters(text)
    assert len(params) == len(names)
    optimizer = torch.optim.SGD(params, lr=0.5)
    text(ids).last_hidden_state.square().mean().backward()
    optimizer.step()
    for n, p in text.named_parameters():
        assert torch.equal(p, original[n]) == (n not in names), n
    saved = adapters.state_dict(text, "s")
    assert set(saved) == set(names)
    adapters.set_scale(text, "s", 0.0)
    torch.testing.assert_close(text(ids).last_hidden_state, base_out)
    adapters.set_scale(text, "s", 1.0)
    assert torch.equal(adapters.state_dict(text, "s")[names[0]], saved[names[0]])
    adapters.remove(text)
    for n, p in text.named_parameters():
        assert torch.equal(p, original[n])


def test_quantize_and_adapter_on_4bit_llm():
    model, _ = build_tiny("tiny-llama")
    ids = torch.tensor([[1, 5, 9, 13]])
    before = model(ids).logits.detach()
    report = adapters.quantize(model, "nf4")
    assert report.layers > 0 and report.bytes_after < report.bytes_before
    assert type(model.lm_head).__name__ == "Linear"
    after = model(ids).logits.detach()
    assert (after - before).abs().max() < 0.5 * before.abs().max()
    adapters.inject(model, "lora", targets="all-linear", name="q", rank=4)
    params = adapters.trainable_parameters(model)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first


def test_4bit_conv_computes_with_its_dequantized_weight_and_trains_locon():
    pytest.importorskip("bitsandbytes")
    from personalize.adapters.quant import dequantized_weight

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 16, 1))
    original = copy.deepcopy(model)
    report = adapters.quantize(model, "nf4", convs=True)
    assert report.layers == 2 and report.bytes_after < report.bytes_before / 4
    for index in (0, 2):  # the same layer with the dequantized weight, in full precision
        original[index].weight.data = dequantized_weight(model[index])
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    model(x).square().sum().backward()
    original(x_ref).square().sum().backward()
    torch.testing.assert_close(model(x), original(x_ref))
    torch.testing.assert_close(x.grad, x_ref.grad)
    adapters.inject(model, "lora", targets=["0", "2"], name="locon", rank=4)
    params = adapters.trainable_parameters(model)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(2, 16, 8, 8)
    losses = []
    for _ in range(5):
        loss = (model(x.detach()) - target).square().mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]


def test_int8_cannot_quantize_convolutions():
    pytest.importorskip("bitsandbytes")
    from personalize.errors import UserError

    with pytest.raises(UserError, match="int8 quantizes Linear layers only"):
        adapters.quantize(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)), "int8", convs=True)
