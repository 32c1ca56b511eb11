"""Shared by the merge tests (a module name no other test folder uses)."""

from __future__ import annotations

import copy

import torch

from personalize import adapters
from personalize.pipelines import load_adapter, unload_adapter

PROMPT = "a photo of {}"


def random_adapter(pipe, method, seed, components=("unet", "text_encoder"), std=0.1, unet_targets="attention", **hyper):
    """{component: canonical state dict} of `method` with random non-zero weights."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component in components:
            module = copy.deepcopy(getattr(pipe, component))
            targets = unet_targets if component == "unet" else None
            adapters.inject(module, method, targets=targets, name="made", **hyper)
            with torch.no_grad():
                for parameter in adapters.trainable_parameters(module):
                    parameter.normal_(0, std)
            out[component] = adapters.state_dict(module, "made")
    return out


@torch.no_grad()
def latents(pipe, prompt):
    """The latents after 3 guided denoising steps at 32 x 32 (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=generator, output_type="latent", height=32, width=32).images


def outputs(pipe, folder, tokens):
    """{token: latents of "a photo of <token>"} with the adapter in `folder` loaded (unloaded after)."""
    name = load_adapter(pipe, str(folder), name="under-test")
    try:
        return {token: latents(pipe, PROMPT.format(token)) for token in tokens}
    finally:
        unload_adapter(pipe, name)
