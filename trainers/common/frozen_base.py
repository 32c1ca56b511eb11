"""The frozen diffusion base every diffusion recipe (DreamBooth, Textual Inversion, conditioning) starts from.

`load_frozen_base` loads the pipeline (or takes the caller's), checks its family, freezes the UNet, VAE and
text encoders and places them (the VAE in fp32: fp16 latents of the SD VAE overflow to NaN). `quantize_base`
and `idle_until_validation` are the two memory steps that follow in the recipes that use them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from personalize.errors import UserError
from personalize.trainers.common.run import DTYPES

UNET_FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass
class FrozenBase:
    pipe: Any
    own_pipe: bool  # loaded by this run (else the caller's, which must be left as it was)
    family: str
    device: torch.device
    weight_dtype: torch.dtype
    text_encoders: dict[str, torch.nn.Module]  # "text_encoder"[, "text_encoder_2"] -> module


def load_frozen_base(config: Any, accelerator: Any, pipe: Any = None) -> FrozenBase:
    from personalize.models import detect_family, load_pipeline

    own_pipe = pipe is None
    if own_pipe:
        pipe = load_pipeline(config.model, torch_dtype=torch.float32, allow_pickle=config.allow_pickle)
    family = detect_family(pipe)
    if family not in UNET_FAMILIES:
        raise UserError(f"--method {config.method} supports SD1.x, SD2.x and SDXL models; {config.model} is {family}")
    weight_dtype = DTYPES[config.mixed_precision]
    device = accelerator.device
    text_encoders = {
        name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None)
    }
    for module in (pipe.unet, pipe.vae, *text_encoders.values()):
        module.requires_grad_(False)
    place(pipe.vae, device, torch.float32)  # fp32 VAE: fp16 latents of the SD VAE overflow to NaN
    for encoder in text_encoders.values():
        place(encoder, device, weight_dtype)
    return FrozenBase(pipe, own_pipe, family, device, weight_dtype, text_encoders)


def with_model_resolution(config: Any, pipe: Any, say: Any) -> Any:
    """config with data.resolution filled in from the base when the user set none (its native side)."""
    from personalize.models import native_resolution

    if config.data.resolution:
        return config
    side = native_resolution(pipe)
    say(f"note: resolution {side} px (the model's own; set it with --resolution)")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, resolution=side))


def place(module: torch.nn.Module, device: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device; cast only when the dtype differs (diffusers warns about every cast)."""
    current = next(module.parameters()).dtype
    return module.to(device) if current == dtype else module.to(device, dtype=dtype)


def quantize_base(
    unet: torch.nn.Module, mode: str, compute_dtype: torch.dtype, from_disk: bool, device: Any = None
) -> None:
    """adapters.quantize_unet, each layer quantized on `device`; `from_disk`: a UNet this run loaded is
    read from its files one weight at a time, so that its full-precision copy is never resident at once."""
    from personalize import adapters
    from personalize.models.mapped import tensor_reader
    from personalize.trainers.common.step_memory import return_freed_memory

    reader = tensor_reader(unet) if from_disk else None
    adapters.quantize_unet(unet, mode, compute_dtype, read_weight=reader, device=device)
    return_freed_memory()  # one read buffer per weight was freed


def idle_until_validation(modules: list[torch.nn.Module], device: Any, own_pipe: bool) -> None:
    """Frozen encoders are not needed again until validation: off the accelerator, or on CPU (a pipeline
    this run loaded) back onto their untouched weight files, so that the pages the cache read leave memory."""
    from personalize.models.mapped import remap

    for module in modules:
        if device.type != "cpu":
            module.to("cpu")
        elif own_pipe:
            remap(module)
