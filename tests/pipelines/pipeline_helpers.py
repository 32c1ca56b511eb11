"""Adapters made in tests, and the same adapters folded into the weights by hand (independent formulas)."""

from __future__ import annotations

import copy

import torch

from personalize import adapters

PROMPT = "a photo of a cat"


def pipeline_copy(tiny_pipelines, name):
    """A private copy of a session pipeline (the fixture's own must never change)."""
    return copy.deepcopy(tiny_pipelines(name))


def latents(pipe, prompt=PROMPT, steps=1, seed=0, **more):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **more).images


def same_state(module, state):
    """True when `module`'s state dict equals `state` (a snapshot) exactly, keys and values."""
    now = module.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[key], value) for key, value in state.items())


def snapshot(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def random_components(pipe, method, components=("unet", "text_encoder"), seed=0, std=0.05, targets=None, **hyper):
    """{component: canonical state dict} of a `method` adapter with random (non-zero) weights; `targets`
    applies to the UNet/transformer, text encoders get their default (KronA: attention, whose widths
    its factors divide)."""
    targets_of_denoiser = targets
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component in components:
            module = copy.deepcopy(getattr(pipe, component))
            denoiser = component in ("unet", "transformer")
            targets = targets_of_denoiser if denoiser else "attention" if method == "krona" else None
            adapters.inject(module, method, targets=targets, name="made", **hyper)
            with torch.no_grad():
                for path, parameter in module.named_parameters():
                    if not parameter.requires_grad:
                        continue
                    if path.endswith("dora_scale"):  # magnitudes: near the row norms they start at
                        parameter.mul_(1 + std * torch.randn_like(parameter))
                    else:
                        parameter.normal_(0, std)
            out[component] = adapters.state_dict(module, "made")
    return out


def hand_delta_weight(group, weight, scale):
    """W' for one layer from its canonical tensors, written from the papers' formulas."""
    if "lora_down.weight" in group:
        down, up = group["lora_down.weight"], group["lora_up.weight"]
        s = scale * float(group["alpha"]) / down.shape[0]
        combined = weight + s * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        if "dora_scale" not in group:
            return combined
        norm = combined.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        return group["dora_scale"].reshape(norm.shape) * combined / norm
    if "hada_w1_a" in group:
        rank = group["hada_w1_b"].shape[0]
        delta = (group["hada_w1_a"] @ group["hada_w1_b"]) * (group["hada_w2_a"] @ group["hada_w2_b"])
        return weight + scale * float(group["alpha"]) / rank * delta.reshape(weight.shape)
    if any(key.startswith("lokr_") for key in group):
        w1 = group["lokr_w1"] if "lokr_w1" in group else group["lokr_w1_a"] @ group["lokr_w1_b"]
        low_rank = "lokr_w2_a" in group or "lokr_w1_a" in group
        if "lokr_w2" in group:
            w2 = group["lokr_w2"]
        else:
            k, n = weight.shape[0] // w1.shape[0], weight.shape[1] // w1.shape[1]
            w2 = (group["lokr_w2_a"] @ group["lokr_w2_b"]).reshape(k, n, *weight.shape[2:])
        rank = group["lokr_w2_a"].shape[1] if "lokr_w2_a" in group else None
        s = float(group["alpha"]) / rank if low_rank else 1.0
        kron = torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2)
        return weight + scale * s * kron.reshape(weight.shape)
    vector = 1 + scale * group["weight"].flatten()  # IA3
    if bool(group["on_input"]):
        return weight * vector.reshape(1, -1, *[1] * (weight.dim() - 2))
    return weight * vector.reshape(-1, *[1] * (weight.dim() - 1))


def merged_by_hand(pipe, components, scale=1.0):
    """A copy of `pipe` (which must have no adapters) with every adapter of `components` folded in by hand."""
    merged = copy.deepcopy(pipe)
    for component, tensors in components.items():
        module = getattr(merged, component)
        for path, group in adapters.group_by_module(tensors).items():
            layer = module.get_submodule(path)
            with torch.no_grad():
                layer.weight.copy_(hand_delta_weight(group, layer.weight.detach().clone(), scale))
    return merged
