"""ControlNeXt (Peng et al. 2024, arXiv 2408.06070): a light conditioning module plus a few UNet weights.

    f = m(cond, t);  h_1 <- h_1 + s * cross_norm(f, h_1);  eps = unet(z_t, t, text | h_1 changed)

where h_1 is the UNet's hidden state after its first down block and cross_norm renormalizes f to h_1's
per-sample mean and std (personalize/adapters/controlnext.py). What trains: the module m and the UNet
parameters matching `conditioning.controlnext_unet` (the authors train the attention output projections,
`to_out`, at lr, and the module at 10 x lr). The UNet's trained values ride on the core's selective
`unfreeze` adapter, which keeps the originals so that the base comes back after training.
Output: `controlnext.safetensors` with `controlnext.*` (the module) and `unet.<parameter>` (trained values
of the UNet subset, the layout of our selective files), the module's config in its metadata; it loads with
`load_adapter(pipe, OUT)` / `personalize generate --adapter OUT --control-image IMG`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personalize import adapters
from personalize.adapters import controlnext as core
from personalize.adapters import selective
from personalize.errors import UserError
from personalize.trainers.conditioning.controlnet import vae_scale_factor

ADAPTER_NAME = "controlnext"
WEIGHT_FILE = "controlnext.safetensors"
MODULE_LR_FACTOR = 10.0  # the authors' script: the module at 10 x the UNet subset's learning rate


class ControlNeXtParts(nn.Module):
    """What trains, as one module: the conditioning module and the UNet's layers whose parameters train
    (the same objects as in the UNet). Its forward runs the UNet, so a DDP wrapper sees the forward."""

    def __init__(self, module: core.ControlNeXt, unet: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.controlnext = module
        paths = sorted({name.rsplit(".", 1)[0] for name in names})
        self.unet_layers = nn.ModuleDict({path.replace(".", "__"): unet.get_submodule(path) for path in paths})
        self.__dict__["names"] = names
        self.__dict__["trained"] = {}  # the trained UNet values while the base is restored (mid-run samples)

    def forward(self, unet: Any, *args: Any, **kwargs: Any) -> Any:
        return unet(*args, **kwargs)


def module_config(pipe: Any, config: Any) -> dict[str, Any]:
    """The authors' SD1.5 module, its output as wide as the UNet's first block, at the configured scale."""
    width = pipe.unet.config.block_out_channels[0]
    return {**core.DEFAULT_CONFIG, "out_dim": width, "scale": config.conditioning.controlnext_scale}


def pair(images: Any, conditioning: Any) -> Any:
    from personalize.data.paired import build_paired

    return build_paired(images, conditioning.folder, conditioning.annotator)


def build(pipe: Any, family: str, config: Any) -> dict[str, nn.Module]:
    unet = pipe.unet
    if core.attached(unet) is not None:
        raise UserError("this UNet already runs a ControlNeXt; unload it before training another")
    torch.manual_seed(config.seed)
    module = core.ControlNeXt(**module_config(pipe, config)).float()
    module.requires_grad_(True)
    pattern = config.conditioning.controlnext_unet
    if pattern:
        adapters.inject(unet, "unfreeze", targets=pattern, name=ADAPTER_NAME)
    names = sorted(selective.registry(unet)[ADAPTER_NAME].originals) if pattern else []
    core.attach(unet, module.to(next(unet.parameters()).device), vae_scale_factor(pipe.vae))
    return {ADAPTER_NAME: ControlNeXtParts(module, unet, names)}


def param_groups(named: dict[str, torch.nn.Parameter], lr: float) -> list[dict[str, Any]]:
    """The module at 10 x lr, the UNet subset at lr (the authors' optimizer groups)."""
    prefix = f"{ADAPTER_NAME}.controlnext."
    module = [param for name, param in named.items() if name.startswith(prefix)]
    unet = [param for name, param in named.items() if not name.startswith(prefix)]
    groups = [{"params": module, "lr": lr * MODULE_LR_FACTOR}]
    return groups + ([{"params": unet, "lr": lr}] if unet else [])


def predict(
    unet: Any,
    models: dict[str, Any],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    kwargs: dict[str, Any],
    batch: dict[str, Any],
    config: Any,
    generator: torch.Generator,
) -> torch.Tensor:
    """The UNet's prediction (B, C, h, w), the control added after its first down block (by the hooks)."""
    core.set_control(unet, batch["conditioning"].to(noisy.device))  # (B, 3, H, W) in [0, 1]
    try:
        return models[ADAPTER_NAME](unet, noisy, timesteps, **kwargs, return_dict=False)[0]
    finally:
        core.set_control(unet, None)


def weights(parts: ControlNeXtParts, unet: nn.Module) -> dict[str, torch.Tensor]:
    """`controlnext.<module parameter>` and `unet.<parameter>` (trained values), as saved."""
    tensors = {f"controlnext.{key}": value for key, value in parts.controlnext.state_dict().items()}
    present = dict(unet.named_parameters())
    tensors.update({f"unet.{name}": present[name] for name in parts.names})
    return {key: value.detach().float().cpu().contiguous() for key, value in tensors.items()}


def save(models: dict[str, Any], pipe: Any, family: str, output: Path, config: Any) -> list[Path]:
    from safetensors.torch import save_file

    parts = models[ADAPTER_NAME]
    info = {
        "method": "controlnext",
        "family": family,
        "base_model": config.model,
        "controlnext": parts.controlnext.config,
        "unet_parameters": config.conditioning.controlnext_unet,
    }
    path = output / WEIGHT_FILE
    partial = path.with_name(path.name + ".partial")
    save_file(weights(parts, pipe.unet), str(partial), metadata={"personalize": json.dumps(info, sort_keys=True)})
    partial.replace(path)
    return [path]


def restore(pipe: Any, side: dict[str, Any]) -> None:
    """The stock UNet back: hooks off, the trained UNet subset back to its original values (the trained
    values kept aside for `reinstall`)."""
    parts = side[ADAPTER_NAME]
    unet = pipe.unet
    core.detach(unet)
    if parts.names:
        present = dict(unet.named_parameters())
        parts.trained.update({name: present[name].detach().clone() for name in parts.names})
        adapters.remove(unet, ADAPTER_NAME)


def reinstall(pipe: Any, side: dict[str, Any]) -> None:
    """After a mid-run sample: the same parameters train again with their trained values, hooks on."""
    parts = side[ADAPTER_NAME]
    unet = pipe.unet
    if parts.names:
        adapters.inject(unet, "unfreeze", targets=parts.names, name=ADAPTER_NAME)
        present = dict(unet.named_parameters())
        with torch.no_grad():
            for name in parts.names:
                present[name].copy_(parts.trained[name])
        parts.trained.clear()
    core.attach(unet, parts.controlnext, vae_scale_factor(pipe.vae))
