"""Shared by the merge tests (a module name no other test folder uses)."""

from __future__ import annotations

import copy

import torch

from personalize import adapters


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
