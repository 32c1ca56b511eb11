"""ControlNeXt (Peng et al. 2024, arXiv 2408.06070): image control from a light conditioning module.

Instead of ControlNet's trainable copy of the UNet encoder, a few conv / ResNet blocks turn the control
image c (and the timestep) into one feature map, which is added once to the UNet's hidden state after
its first down block, after **cross normalization** to that state's statistics:

    f = m(c, t)  pooled to h's size                 (B, C, h, w)
    f' = (f - mean(f)) / (std(f) + eps) * std(h) + mean(h)     (per sample, over C, h, w)
    h <- h + s * f'                                 s = the module's scale (0.35 in the authors' SD1.5 runs)

so the control starts at the magnitude of the features it steers: no zero convolutions, no slow start.
The module trains together with a small subset of the UNet (the authors: the attention output
projections `to_out`). The skip connections of the first block are not changed (they are taken before
the addition), as in the authors' UNet.

`attach(unet, module)` adds it to a stock diffusers UNet2DConditionModel through forward hooks, so
training and generation (stock pipelines) run the same code; `set_control(unet, image)` gives it the
control image (B or 1, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

HOOKS_ATTRIBUTE = "_personalize_controlnext"
EPS = 1e-12  # the authors' epsilon: only guards a constant control map
DEFAULT_CONFIG: dict[str, Any] = {
    "time_embed_dim": 256,
    "in_channels": [128, 128],
    "out_channels": [128, 256],
    "groups": [4, 8],
    "out_dim": 320,  # the UNet's first block width (block_out_channels[0])
    "scale": 0.35,
}


def cross_normalize(control: torch.Tensor, hidden: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The control map (B, C, h, w) renormalized to the per-sample mean and std of `hidden` (B, C, h, w)."""
    dims = (1, 2, 3)
    mean_c, std_c = control.mean(dim=dims, keepdim=True), control.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    mean_h, std_h = hidden.mean(dim=dims, keepdim=True), hidden.std(dim=dims, keepdim=True)
    return (control - mean_c) * (std_h / (std_c + eps)) + mean_h


class ControlNeXt(nn.Module):
    """m(c, t): stride-2 conv embedding, (ResNet block + strided conv) per stage, a residual conv pair, and
    a 1x1 conv to the UNet's width. Built from diffusers' blocks; (B, 3, H, W) -> (B, out_dim, H/8, W/8)."""

    def __init__(
        self,
        time_embed_dim: int = 256,
        in_channels: list[int] | tuple[int, ...] = (128, 128),
        out_channels: list[int] | tuple[int, ...] = (128, 256),
        groups: list[int] | tuple[int, ...] = (4, 8),
        out_dim: int = 320,
        scale: float = 0.35,
    ) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D

        self.config = {
            "time_embed_dim": time_embed_dim,
            "in_channels": list(in_channels),
            "out_channels": list(out_channels),
            "groups": list(groups),
            "out_dim": out_dim,
            "scale": float(scale),
        }
        self.scale = float(scale)
        self.time_proj = Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(128, time_embed_dim)
        first = in_channels[0]
        self.embedding = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1),
            nn.GroupNorm(2, 64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GroupNorm(2, 64),
            nn.ReLU(),
            nn.Conv2d(64, first, 3, padding=1),
            nn.GroupNorm(2, first),
            nn.ReLU(),
        )
        self.down_res = nn.ModuleList(
            ResnetBlock2D(in_channels=i, out_channels=o, temb_channels=time_embed_dim, groups=g)
            for i, o, g in zip(in_channels, out_channels, groups, strict=True)
        )
        self.down_sample = nn.ModuleList(
            Downsample2D(o, use_conv=True, out_channels=o, padding=1, name="op") for o in out_channels
        )
        last = out_channels[-1]
        self.mid = nn.Sequential(
            nn.Conv2d(last, last, 3, padding=1),
            nn.ReLU(),
            nn.GroupNorm(8, last),
            nn.Conv2d(last, last, 3, padding=1),
            nn.GroupNorm(8, last),
        )
        self.out = nn.Conv2d(last, out_dim, 1)

    def forward(self, control: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """control (B, 3, H, W) in [0, 1], timesteps (B,) -> features (B, out_dim, H/8, W/8)."""
        dtype = self.out.weight.dtype
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))  # (B, time_embed_dim)
        x = self.embedding(control.to(dtype))  # (B, C0, H/2, W/2)
        for res, down in zip(self.down_res, self.down_sample, strict=True):
            x = down(res(x, emb))  # halves the size
        x = self.mid(x) + x
        return self.out(x)


class _Hooks:
    """The hooks that run a ControlNeXt inside a UNet: a pre-hook on the UNet keeps the timesteps, a hook
    on its first down block adds the cross-normalized control to the block's output hidden state."""

    def __init__(self, unet: nn.Module, module: ControlNeXt, pixels_per_latent: int) -> None:
        self.module = module
        self.pixels_per_latent = pixels_per_latent
        self.control: torch.Tensor | None = None  # (1 or B, 3, H, W) in [0, 1]
        self.strength = 1.0
        self.timesteps: torch.Tensor | None = None
        self.size: tuple[int, int] = (0, 0)  # the pixel size of the image being denoised
        self.handles = [
            unet.register_forward_pre_hook(self._keep_timesteps, with_kwargs=True),
            unet.down_blocks[0].register_forward_hook(self._add_control),
        ]

    def _keep_timesteps(self, unet: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        self.timesteps = timesteps.reshape(-1).expand(sample.shape[0]) if timesteps.numel() == 1 else timesteps
        self.size = (sample.shape[-2] * self.pixels_per_latent, sample.shape[-1] * self.pixels_per_latent)

    def _add_control(self, block: nn.Module, inputs: tuple, output: Any) -> Any:
        if self.control is None or self.strength == 0.0 or self.timesteps is None:
            return None
        hidden, skips = output  # the skips were taken before the addition, as in the authors' UNet
        batch = hidden.shape[0]
        control = self.control.to(hidden.device)  # (1 or B, 3, H, W)
        if control.shape[-2:] != self.size:  # a control image of another size: to the generated image's
            control = F.interpolate(control.float(), size=self.size, mode="bilinear", antialias=True)
        if control.shape[0] != batch:  # one image for all (1), or per prompt for both halves of guidance
            control = control.repeat(batch // control.shape[0], 1, 1, 1)
        features = self.module(control, self.timesteps.to(hidden.device))  # (B, C, H/8, W/8)
        features = F.adaptive_avg_pool2d(features, hidden.shape[-2:]).to(hidden.dtype)  # (B, C, h, w)
        scale = self.module.scale * self.strength
        return hidden + scale * cross_normalize(features, hidden), skips

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attach(unet: nn.Module, module: ControlNeXt, pixels_per_latent: int = 8) -> None:
    """Run `module` inside `unet` (a diffusers UNet2DConditionModel) from now on; one ControlNeXt at a time.
    `pixels_per_latent`: the VAE's downscale (8 for SD), to bring a control image to the generated size."""
    from personalize.errors import UserError

    if HOOKS_ATTRIBUTE in unet.__dict__:
        raise UserError("this UNet already runs a ControlNeXt; unload it first")
    if module.config["out_dim"] != unet.config.block_out_channels[0]:
        raise UserError(
            f"the ControlNeXt outputs {module.config['out_dim']} channels but this UNet's first block has "
            f"{unet.config.block_out_channels[0]}; is it for another model family?"
        )
    unet.__dict__[HOOKS_ATTRIBUTE] = _Hooks(unet, module, pixels_per_latent)


def attached(unet: nn.Module) -> ControlNeXt | None:
    hooks = unet.__dict__.get(HOOKS_ATTRIBUTE)
    return hooks.module if hooks is not None else None


def set_control(unet: nn.Module, image: torch.Tensor | None, strength: float = 1.0) -> None:
    """The control image (B or 1, 3, H, W) in [0, 1] the next UNet calls use (None: no control)."""
    hooks = unet.__dict__[HOOKS_ATTRIBUTE]
    hooks.control, hooks.strength = image, float(strength)


def detach(unet: nn.Module) -> None:
    """Remove the hooks: the UNet is the stock model again."""
    hooks = unet.__dict__.pop(HOOKS_ATTRIBUTE, None)
    if hooks is not None:
        hooks.remove()
