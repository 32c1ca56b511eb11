"""DiffFit on the UNet and on the SD3 / Flux transformers: inject, forward, scale, save/load, remove."""

from __future__ import annotations

import copy

import pytest
import torch

from personalize import adapters
from personalize.errors import UserError

from ..formats.helpers import copy_pipeline, images


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer


def _perturb(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model, "fit"):
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sd3", "tiny-flux"])
def test_difffit_injects_trains_saves_and_loads(tiny_pipelines, name):
    pipe = tiny_pipelines(name)
    ours = copy_pipeline(pipe) if name == "tiny-sd15" else copy.deepcopy(pipe)
    model = _denoiser(ours)
    base = images(pipe)
    paths = adapters.inject(model, "difffit", name="fit")
    gammas = [p for p in paths if not p.endswith((".bias", ".weight"))]
    assert gammas and any(p.endswith(".bias") for p in paths)
    expected = {"tiny-sd15": ("to_out.0", "ff.net.2", "conv2"), "tiny-sd3": ("to_out.0", "ff.net.2")}
    expected["tiny-flux"] = ("to_out.0", "to_add_out", "ff_context.net.2", "proj_out")
    assert all(any(p.endswith(suffix) for p in gammas) for suffix in expected[name])
    trainable = {id(p) for p in adapters.trainable_parameters(model, "fit")}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 0.1 * sum(
        p.numel() for p in model.parameters()
    )
    assert torch.allclose(torch.as_tensor(images(ours)), torch.as_tensor(base), atol=1e-6)  # gamma = 1: unchanged
    _perturb(model)
    trained = images(ours)
    assert not torch.allclose(torch.as_tensor(trained), torch.as_tensor(base), atol=1e-3)

    state = adapters.state_dict(model, "fit")
    fresh = copy_pipeline(pipe) if name == "tiny-sd15" else copy.deepcopy(pipe)
    layers = sorted(k.rsplit(".", 1)[0] for k in state if k.endswith(".difffit_gamma"))
    adapters.inject(_denoiser(fresh), "difffit", targets=layers, name="fit")
    adapters.load_state_dict(_denoiser(fresh), state, "fit")
    torch.testing.assert_close(torch.as_tensor(images(fresh)), torch.as_tensor(trained))

    adapters.merge(model, "fit")
    torch.testing.assert_close(torch.as_tensor(images(ours)), torch.as_tensor(trained), atol=1e-4, rtol=1e-4)
    adapters.unmerge(model, "fit")
    adapters.set_scale(model, "fit", 0.0)
    torch.testing.assert_close(torch.as_tensor(images(ours)), torch.as_tensor(base), atol=1e-5, rtol=1e-5)
    adapters.remove(model, "fit")
    assert not any(isinstance(m, adapters.AdapterLayer) for m in model.modules())
    torch.testing.assert_close(torch.as_tensor(images(ours)), torch.as_tensor(base), atol=1e-5, rtol=1e-5)


def test_difffit_refuses_options_and_clashing_selective_adapters(tiny_pipelines):
    unet = copy.deepcopy(tiny_pipelines("tiny-sd15").unet)
    with pytest.raises(UserError, match="no options"):
        adapters.inject(unet, "difffit", rank=4)
    adapters.inject(unet, "bitfit", name="b")
    with pytest.raises(UserError, match="already trained"):
        adapters.inject(unet, "difffit", name="fit")
