"""Shared helpers: attach randomized adapters to copies of the tiny pipelines and compare outputs."""

from __future__ import annotations

import copy
from typing import Any

import torch

from personalize import adapters
from personalize.models.tiny_layers import randomize

# Targets that give every method linear and conv layers to wrap on the tiny UNets.
UNET_TARGETS = {
    "lora": "attention",
    "locon": "all",
    "dora": "attention+ff",
    "loha": "all",
    "lokr": "all",
    "krona": "attention",
    "ia3": "attention+ff",
}
HYPER: dict[str, dict[str, Any]] = {
    "lora": {"rank": 4, "alpha": 2},
    "locon": {"rank": 4, "alpha": 8},
    "dora": {"rank": 4, "alpha": 4},
    "loha": {"rank": 4, "alpha": 2},
    "lokr": {"rank": 2, "alpha": 1, "factor": 4},
    "krona": {"a1": 4, "a2": 4},
    "ia3": {},
}
ADAPTER_METHODS = tuple(HYPER)


def copy_pipeline(pipe: Any) -> Any:
    """The pipeline with its own copies of the UNet and text encoders (the VAE and the rest are shared)."""
    parts = dict(pipe.components)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if parts.get(name) is not None:
            parts[name] = copy.deepcopy(parts[name])
    return type(pipe)(**parts)


def with_adapter(pipe: Any, method: str, text: bool = True, seed: int = 3) -> tuple[Any, dict]:
    """A deep copy of `pipe` with `method` on its UNet (and text encoders); returns it and its component dict."""
    ours = copy_pipeline(pipe)
    inject_method = "lora" if method == "locon" else method
    adapters.inject(ours.unet, inject_method, targets=UNET_TARGETS[method], **HYPER[method])
    names = ["unet"]
    if text and method not in ("krona", "ia3"):
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(ours, name, None) is not None:
                adapters.inject(getattr(ours, name), inject_method, targets="text", **HYPER[method])
                names.append(name)
    for i, name in enumerate(names):
        model = getattr(ours, name)
        for _, module in model.named_modules():
            if hasattr(module, "adapters") and "default" in module.adapters:
                randomize(module.adapters["default"], seed + i)
    return ours, {name: adapters.state_dict(getattr(ours, name)) for name in names}


def unet_inputs(pipe: Any) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    unet = pipe.unet
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    hidden = torch.randn(1, 7, unet.config.cross_attention_dim, generator=generator)
    kwargs: dict[str, Any] = {"sample": sample, "timestep": torch.tensor([10]), "encoder_hidden_states": hidden}
    if unet.config.addition_embed_type == "text_time":
        text_embeds = torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * 8, generator=generator)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": torch.zeros(1, 6)}
    return kwargs


@torch.no_grad()
def unet_out(pipe: Any, inputs: dict[str, Any]) -> torch.Tensor:
    return pipe.unet(**inputs).sample


@torch.no_grad()
def text_out(pipe: Any) -> torch.Tensor:
    ids = torch.arange(2, 9)[None]
    return pipe.text_encoder(ids).last_hidden_state


def images(pipe: Any) -> Any:
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo", num_inference_steps=2, generator=generator, output_type="np", height=32, width=32).images


def assert_same_components(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for component in a:
        assert set(a[component]) == set(b[component]), component
        for key, value in a[component].items():
            other = b[component][key]
            assert other.shape == value.shape, key
            assert torch.equal(other.to(value.dtype), value), key
